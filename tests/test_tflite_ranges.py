"""The shipped int8 TFLite keeps the quantize stage's activation ranges instead of recalibrating them."""

import json

import numpy as np
import onnx

from edgekit.formats import tflite, tflite_ranges


def test_int8_tflite_carries_nncf_activation_ranges(e2e_build):
    out, _ = e2e_build
    records = json.loads((out / "stages" / "export" / "artifacts.json").read_text())
    int8 = [r for r in records if r["format"] == "tflite" and r["precision"] == "int8"]
    assert int8, "the default targets ship an int8 TFLite"
    nncf = tflite_ranges.activation_ranges(
        onnx.load(str(out / "stages" / "quantize" / tflite_ranges.QDQ_FILE)).graph)
    assert nncf, "NNCF's QDQ export quantizes activations"
    for rec in int8:
        carried = rec["activation_ranges"]
        assert carried["quantizers"] == len(nncf) and carried["carried"] == len(nncf), carried
        interp = tflite.interpreter((out / "stages" / "export" / rec["file"]).read_bytes())
        scales = np.array([d["quantization"][0] for d in interp.get_tensor_details()
                           if np.dtype(d["dtype"]) == np.int8])
        for name, (lo, hi) in nncf.items():  # NNCF's int8/uint8 grid: 255 steps over its range
            want = (hi - lo) / 255
            assert np.isclose(scales, want, rtol=1e-5).any(), f"{name}: no int8 tensor with NNCF's scale {want}"


def test_without_a_quantize_stage_the_converter_calibrates(tmp_path):
    class Ctx:
        def stage_dir(self, name):
            return tmp_path / name

    assert tflite_ranges.carried_ranges(Ctx(), "train", np.zeros((1, 1, 8, 8), np.float32)) is None
    assert tflite_ranges.carried_ranges(Ctx(), "quantize", np.zeros((1, 1, 8, 8), np.float32)) is None

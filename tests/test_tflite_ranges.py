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
        assert carried["not_paired"] == [] and carried["per_channel_left_to_converter"] == [], carried
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


def test_a_quantizer_pairs_with_the_tensors_that_hold_its_values():
    rng = np.random.default_rng(0)
    want = rng.random((2, 3, 4, 4), dtype=np.float32)
    nhwc = np.moveaxis(want, 1, -1)
    other = rng.random(nhwc.shape, dtype=np.float32)
    assert tflite_ranges.pairs(want, {5: other, 7: nhwc * 1.005}) == [7]  # channels-last, ~0.5 % off
    assert tflite_ranges.pairs(want, {5: nhwc, 7: nhwc.reshape(2, -1), 9: other}) == [5, 7]  # a reshape: both
    assert tflite_ranges.pairs(want, {5: other, 7: nhwc[..., :2]}) == []  # nothing close, nothing the same size

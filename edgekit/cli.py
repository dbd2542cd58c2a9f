"""Command line: a thin layer over the Python API. Only this module exits."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import sys
import warnings
from datetime import datetime
from pathlib import Path

from edgekit import quiet, stop
from edgekit.errors import (
    WRITE_ERRORS,
    BuildDirError,
    BundleError,
    ConfigError,
    EdgekitError,
    NothingFeasible,
    UsageError,
)

quiet.setup()  # before anything imports tensorflow

MANIFEST_KEYS = {"target": dict, "artifacts": list, "primary": str, "files": dict, "bundle_id": str}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line like every other error, not argparse's usage block
        raise UsageError(f"{message}; see `{self.prog} --help`")


def _cmd_build(args: argparse.Namespace) -> int:
    from edgekit import config, pipeline, report

    if args.resume:
        out = Path(args.resume)
        if args.out and Path(args.out).resolve() != out.resolve():
            raise BuildDirError(f"--out '{args.out}' and --resume '{out}' name different folders; "
                                "--resume continues a build in its own folder, so drop --out")
        pipeline.check_resumable(out)
        cfg = config.load(args.config or out / pipeline.CONFIG_FILE, log=print)
    else:
        cfg = config.load(args.config, log=print)
        out = Path(args.out or f"runs/{datetime.now():%Y%m%d-%H%M%S}")
    args.build_dir = out  # for the interrupt message
    if args.allow_fidelity_miss:
        cfg = dataclasses.replace(cfg, build=dataclasses.replace(cfg.build, allow_fidelity_miss=True))
    result = pipeline.build(cfg, out, args.target, resume=bool(args.resume))
    print()
    print(report.summary_table(result))
    print(f"\nreport: {out / 'report.html'} (data: {out / 'report.json'})")
    _print_next(out, result)
    return 0


def _print_next(out: Path, result: dict) -> None:
    print("next:")
    for b in result["bundles"]:
        if b["target"] in result["runs"]:
            print(f"  edgekit run {b['path']}            # measure again on this machine")
        else:
            t = b["target"]
            print(f"  copy {b['archive']} to the {t} device, then there: "
                  f"tar xzf {t}.tar.gz && python3 {t}/runner.py {t}")


def _cmd_debug(args: argparse.Namespace) -> int:
    import json

    from edgekit import config, fidelity, pipeline
    from edgekit.files import write_json
    from edgekit.stages import verify

    out = Path(args.build_dir)
    if not (out / "config.yaml").is_file() or not (out / "stages" / "export" / "metrics.json").is_file():
        raise EdgekitError(f"'{out}' is not a build directory with exported artifacts; run `edgekit build` first")
    targets = json.loads((out / "stages" / "export" / "metrics.json").read_text()).get("targets")
    record = verify.debug(pipeline.make_context(config.load(out / "config.yaml"), out, targets), args.artifact)
    print(f"{record['artifact']} ({record['numerics']['name']} numerics): "
          f"{', '.join(record['misses']) or 'meets its thresholds'}; {record['rule']}")
    print(fidelity.table(record["layers"], args.top, record["thresholds"]["min_sqnr_db"]))
    saved = out / "fidelity" / f"{record['artifact']}.json"  # `edgekit report` shows its layers
    write_json(saved, record)
    print(f"written: {saved}")
    return 0


def _json_file(path: Path, what: str, hint: str, error: type[EdgekitError] = BundleError) -> object:
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or not UTF-8
        raise error(f"{what} '{path}' cannot be read as JSON ({type(exc).__name__}); {hint}") from exc


def _manifest_problem(manifest: object) -> str | None:
    if not isinstance(manifest, dict):
        return f"it holds a JSON {type(manifest).__name__}, not an object"
    for key, kind in MANIFEST_KEYS.items():
        if not isinstance(manifest.get(key), kind):
            return f"'{key}' is missing or not a JSON {kind.__name__}"
    if not all(isinstance(a, dict) and isinstance(a.get("name"), str) and isinstance(a.get("file"), str)
               for a in manifest["artifacts"]) or not manifest["artifacts"]:
        return "'artifacts' must list objects with a name and a file"
    if not {"name", "arch"} <= manifest["target"].keys():
        return "'target' needs a name and an arch"
    return None


def check_bundle(path: str) -> Path:
    """A bundle folder whose manifest has the form edgekit writes, else one line that says what to pass."""
    bundle = Path(path)
    if bundle.is_file():
        packed = bundle.name.endswith((".tar.gz", ".tgz"))
        hint = f"unpack it (tar xzf {bundle}) and pass the folder" if packed else "pass a folder from DIR/bundles/"
        raise BundleError(f"'{bundle}' is a file, not a bundle folder; {hint}")
    if not bundle.is_dir():
        raise BundleError(f"bundle folder '{bundle}' not found; pass a folder from DIR/bundles/")
    manifest_path = bundle / "manifest.json"
    if not manifest_path.is_file():
        raise BundleError(f"'{bundle}' is not a bundle (no manifest.json); pass a folder from DIR/bundles/")
    again = "rebuild the bundle or copy it again"
    manifest = _json_file(manifest_path, "manifest", again)
    problem = _manifest_problem(manifest)
    if problem:
        raise BundleError(f"'{manifest_path}' is not an edgekit manifest: {problem}; {again}")
    from edgekit.runner import runner

    problem = runner.file_problem(bundle, manifest)  # a damaged copy is said to be one, before any runtime runs
    if problem:
        raise BundleError(f"'{bundle}': {problem}")
    return bundle


def _check_out_file(path: str | None, option: str, example: str = "results.json") -> Path | None:
    """A file to write: not a folder, in a folder that exists or can be made."""
    if path is None:
        return None
    out = Path(path)
    if out.is_dir():
        raise ConfigError(f"{option} '{out}' is a folder; give a file name, e.g. {out / example}")
    parent = next((p for p in out.parents if p.exists()), Path("."))
    if not parent.is_dir():
        raise ConfigError(f"{option} '{out}': '{parent}' is a file, not a folder; pick another path")
    _check_writable(out if out.exists() else parent, option, out)
    return out


def _check_writable(place: Path, option: str, out: Path) -> None:
    """Before the work, not after it: a read-only file system or a place this user may not write."""
    if not os.access(place, os.W_OK):
        raise ConfigError(f"{option} '{out}': '{place}' is not writable (read-only, or no permission); "
                          "pick a writable path")


def _check_run_numbers(args: argparse.Namespace) -> None:
    limits = {"threads": 1, "warmup_runs": 0, "warmup_seconds": 0, "min_runs": 1, "min_seconds": 0, "max_seconds": 0}
    for key, least in limits.items():
        value = getattr(args, key)
        if value is not None and not (math.isfinite(value) and value >= least):  # argparse's float takes nan, inf
            raise ConfigError(f"--{key.replace('_', '-')} is {value}; give "
                              f"{'' if math.isfinite(value) else 'a finite number, '}at least {least}")
    if args.max_seconds is not None and args.min_seconds is not None and args.max_seconds < args.min_seconds:
        raise ConfigError(f"--max-seconds {args.max_seconds:g} is below --min-seconds {args.min_seconds:g}; the "
                          "timing stops at --max-seconds, so give it at least --min-seconds")


def _cmd_run(args: argparse.Namespace) -> int:
    from edgekit.device import measure

    _check_run_numbers(args)
    _check_out_file(args.out, "--out")
    check_bundle(args.bundle)
    overrides = {k: getattr(args, k) for k in ("warmup_runs", "warmup_seconds", "min_runs", "min_seconds",
                                               "max_seconds")}
    out = Path(args.out) if args.out else None
    if args.host:
        from edgekit.device import remote

        result, path = remote.run_remote(Path(args.bundle), _connection(args), python=args.python, setup=args.setup,
                                         artifacts=args.artifact, threads=args.threads, mode=args.mode,
                                         overrides=overrides, out=out, keep=args.keep)
    else:
        path = out or Path(args.bundle) / "results.json"
        result = measure.run_bundle(Path(args.bundle), out, args.artifact, args.threads, mode=args.mode,
                                    overrides=overrides)
    print(measure.compare_table(result))
    print(f"results: {path}")
    return 0


def _run_options(r: argparse.ArgumentParser) -> None:
    r.add_argument("bundle")
    r.add_argument("--out", help="results file (default: BUNDLE/results.json; with --host BUNDLE/results-HOST.json)")
    r.add_argument("--artifact", action="append", help="artifact name (repeatable; default: all)")
    r.add_argument("--threads", type=int, help="override the target's thread count")
    r.add_argument("--mode", choices=("all", "latency", "accuracy"), help="what to measure (default: all)")
    for key, kind in (("warmup-runs", int), ("warmup-seconds", float), ("min-runs", int), ("min-seconds", float),
                      ("max-seconds", float)):
        r.add_argument(f"--{key}", type=kind, help=f"override the bundle's run.{key.replace('-', '_')}")
    ssh = _ssh_options(r, "user@host of the device: copy the bundle there, run it, bring results back")
    ssh.add_argument("--keep", action="store_true", help="keep the remote folder (default: removed)")


def _ssh_options(p: argparse.ArgumentParser, host_help: str):
    ssh = p.add_argument_group("on a device over SSH (keys only; host keys are checked)")
    ssh.add_argument("--host", help=host_help)
    ssh.add_argument("--port", type=int, help="SSH port (default: 22 or ~/.ssh/config)")
    ssh.add_argument("--identity", metavar="FILE", help="private key file (default: ssh-agent / ~/.ssh)")
    ssh.add_argument("--python", default="python3", help="Python on the device (default: python3)")
    ssh.add_argument("--setup", action="store_true",
                     help="make a venv on the device and pip install numpy and the runtime the target pins")
    ssh.add_argument("--accept-new-host-key", action="store_true",
                     help="trust an unknown host key and pin it in edgekit's known-hosts file")
    return ssh


def _connection(args: argparse.Namespace):
    from edgekit.device import remote

    return remote.Connection(args.host, port=args.port, identity=args.identity,
                             accept_new_host_key=args.accept_new_host_key)


def _cmd_compare(args: argparse.Namespace) -> int:
    from edgekit.device import measure

    csv_path = _check_out_file(args.csv, "--csv", "compare.csv")
    for path in map(Path, args.results):
        hint = "pass results.json files written by `edgekit run`"
        if not isinstance(_json_file(path, "results file", hint, ConfigError), dict):
            raise ConfigError(f"'{path}' is not a results file (not a JSON object); pass one written by `edgekit run`")
    try:
        table = measure.compare([Path(p) for p in args.results], csv_path)
    except OSError as exc:
        raise ConfigError(f"cannot write --csv '{csv_path}': {exc.strerror}; pick a writable path") from exc
    print(table)
    if csv_path:
        print(f"csv: {csv_path}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from edgekit import browser, report_html

    paths = [Path(p) for p in args.sources]
    default = paths[0] / "report.html" if len(paths) == 1 and paths[0].is_dir() else Path("report.html")
    _check_out_file(args.screenshot, "--screenshot", "report.png")
    out = report_html.write(paths, _check_out_file(args.out, "--out", "report.html") or default)
    print(f"report: {out}")
    if args.screenshot:
        print(f"screenshot: {browser.screenshot(out, Path(args.screenshot))}")
    return 0


def _add_report(sub) -> None:
    r = sub.add_parser("report", help="one self-contained HTML page for one or more builds, bundles or results "
                                      "files, side by side")
    r.add_argument("sources", nargs="+", metavar="DIR",
                   help="build folder (with report.json), bundle folder or results.json")
    r.add_argument("--out", metavar="FILE", help="HTML file (default: DIR/report.html for one folder, else "
                                                 "./report.html)")
    r.add_argument("--screenshot", metavar="PNG", help="also save a 1280-pixel-wide screenshot (headless Chromium)")
    r.set_defaults(func=_cmd_report)


def _cmd_docker(args: argparse.Namespace) -> int:
    from edgekit import targets
    from edgekit.device import images

    if args.write_dockerfiles:
        for path in images.write_repo_files(list(targets.builtin().values())):
            print(f"wrote {path}")
        return 0
    if not args.target:
        raise EdgekitError("name a target (edgekit targets lists them), or pass --write-dockerfiles")
    target = targets.get([args.target])[0]
    bundle = check_bundle(args.bundle) if args.bundle else None
    out = Path(args.out or (bundle.parent.parent / "docker" / target.name if bundle else f"docker-{target.name}"))
    done = images.make(target, out, bundle=bundle, tag=args.tag, base=args.base, build=args.build,
                       offline=args.offline_base)
    print(f"context: {done['context']}")
    if done.get("message"):
        print(done["message"])
    elif not done["built"]:
        print(f"build with: {done['command']}")
    else:
        print(f"built {done['tag']} ({done['builder']}: {done['command']})")
    print(f"run with:  docker run --rm --network none --user \"$(id -u):$(id -g)\" -v \"$PWD/results:/results\" "
          f"{done['tag']}"
          + ("   # arm64: add --platform linux/arm64 (QEMU here; timings are not the device's)"
             if done["emulated"] else ""))
    return 0


def _add_docker(sub) -> None:
    d = sub.add_parser("docker", help="Docker build context (and image) of a target's runtime, with a bundle")
    d.add_argument("target", nargs="?", help="target name")
    d.add_argument("--bundle", help="bundle folder to bake into the image (default: none; mount one at run time)")
    d.add_argument("--tag", help="image tag (default: edgekit-runner-TARGET:BUNDLE_ID)")
    d.add_argument("--out", help="context folder (default: BUILD/docker/TARGET, or ./docker-TARGET)")
    d.add_argument("--base", help="base image with Python and the runtime (default: edgekit-base-TARGET:...)")
    d.add_argument("--build", action="store_true", help="build the image (docker buildx build --platform ...)")
    d.add_argument("--offline-base", action="store_true",
                   help="make the base image from Debian packages and wheels (no image registry needed), then build")
    d.add_argument("--write-dockerfiles", action="store_true", help="regenerate docker/ from targets/*.yaml")
    d.set_defaults(func=_cmd_docker)


def _add_compare(sub) -> None:
    c = sub.add_parser("compare", help="side-by-side table of several results.json files (--csv: also as CSV)")
    c.add_argument("results", nargs="+", help="results files written by `edgekit run`")
    c.add_argument("--csv", metavar="FILE", help="also write the table as CSV to FILE")
    c.set_defaults(func=_cmd_compare)


def _cmd_check(args: argparse.Namespace) -> int:
    from edgekit.device import bundle_check, runtime_check
    from edgekit.files import write_json

    _check_out_file(args.out, "--out")
    bundle = check_bundle(args.bundle)
    result = bundle_check.verify_bundle(bundle, args.emulate)
    out = Path(args.out) if args.out else bundle / "check.json"
    write_json(out, result)
    print(runtime_check.table(result))
    print(f"results: {out}")
    failed = [f"{n}: {c.get('hint') or c.get('error')}" for n, c in result["artifacts"].items() if c["ok"] is False]
    if failed:
        raise EdgekitError("the target's pinned runtime cannot run this bundle as built:\n  " + "\n  ".join(failed))
    return 0


def _add_check(sub) -> None:
    v = sub.add_parser("check", help="load and run a bundle with the runtime version its target pins "
                                      "(isolated, cached); --emulate: an aarch64 bundle under qemu")
    v.add_argument("bundle")
    v.add_argument("--emulate", action="store_true",
                   help="also run an aarch64 bundle's runner under qemu-aarch64-static and compare with x86")
    v.add_argument("--out", help="results file (default: BUNDLE/check.json)")
    v.set_defaults(func=_cmd_check)


def _cmd_targets(args: argparse.Namespace) -> int:
    from edgekit import targets

    if args.check:
        t = targets.load_file(Path(args.check))
        print(f"{args.check}: ok (target '{t.name}', {t.arch}, {len(t.artifacts)} artifacts)")
        return 0
    from edgekit.device.measure import aligned

    rows = []
    for t in targets.available().values():
        arts = ", ".join(f"{a.key}@{a.runtime}=={a.runtime_version}" for a in t.artifacts)
        own = "" if Path(t.source).parent == targets.TARGETS_DIR else f"  [{t.source}]"
        rows.append([t.name, t.arch, str(t.threads), arts, t.description + own])
    print(aligned(["name", "arch", "threads", "artifacts (first is primary)", "description"], rows,
                  [False, False, True, False, False]))
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from edgekit import config

    print(config.default_yaml() if args.default else config.dump(config.load(args.file)), end="")
    return 0


def _cmd_sensitivity(args: argparse.Namespace) -> int:
    from edgekit import config, models, sensitivity, training
    from edgekit.data import load_dataset
    from edgekit.files import write_json

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out '{out}' is a file; pass the folder for sensitivity.json and sensitivity.png")
    _check_writable(next(p for p in (out, *out.parents) if p.exists()), "--out", out)
    cfg = config.load(args.config)
    data = load_dataset(cfg)
    training.seed_everything(cfg.train.seed)
    model = models.build_model(cfg, data.sample_shape, data.num_classes)
    t = cfg.train
    training.fit(model, data.train, data.val, epochs=t.epochs, lr=t.lr, batch_size=t.batch_size,
                 weight_decay=t.weight_decay, seed=t.seed, workers=t.workers)
    result = sensitivity.analyse(model, data, protect_stem=cfg.prune.protect_stem)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "sensitivity.json", {**result, "layer_ratios": sensitivity.to_ratios(result)})
    sensitivity.plot(result, out / "sensitivity.png")
    for name, drops in result["layers"].items():
        print(f"{name:<28} " + "  ".join(f"{r}: {100 * d:+.1f} pp" for r, d in drops.items()))
    print(f"wrote {out / 'sensitivity.json'} and {out / 'sensitivity.png'}")
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    from edgekit import config
    from edgekit.search import run

    if args.out is None and args.resume:
        raise ConfigError("--resume continues the search in --out DIR; pass --out")
    if len(args.target) > 1:  # `edgekit build` takes several; a search is for one target's budgets
        raise ConfigError(f"edgekit search takes one --target (got {', '.join(args.target)}); run one search per "
                          "target")
    args.target = args.target[0]
    out = Path(args.out or f"runs/search-{datetime.now():%Y%m%d-%H%M%S}")
    args.search_dir = out  # for the interrupt message
    saved = out / run.CONFIG_FILE
    cfg = config.load(args.config or (saved if args.resume and saved.is_file() else None), log=print)
    device = run.Device(_connection(args), args.python, args.setup) if args.host else None
    result = run.search(cfg, args.target, out, trials=args.trials, budget=args.budget, resume=args.resume,
                        ray_address=args.ray_address, workers=args.workers, device=device,
                        device_results=args.device_results, stage_cache=not args.no_stage_cache)
    ok = [t for t in result["trials"] if t["status"] == "ok"]
    n = len(result["trials"])
    print(f"\n{n} trial{'' if n == 1 else 's'} ({len(ok)} built, {result['trials_run_now']} run now) in "
          f"{result['seconds']['total']:.0f} s; Pareto front: "
          f"{', '.join(t['id'] for t in result['trials'] if t.get('pareto')) or 'none'}")
    for t in result["trials"]:
        if t["status"] != "ok":
            print(f"  {t['id']}: {t['status']}{': ' + t['reason'] if t.get('reason') else ''}")
        elif not t["feasible"]:
            print(f"  {t['id']}: infeasible: {'; '.join(t['infeasible_because'])}")
    best = next((t for t in result["trials"] if t["id"] == result["recommended"]), None)
    if best is not None:
        print(f"recommended: {best['id']} ({', '.join(f'{k}={v}' for k, v in best['overrides'].items())}): "
              f"accuracy {best['accuracy']:.4f}, p90 {best['latency_p90_ms']:.3g} ms ({best['latency_source']}), "
              f"{best['size_bytes'] / 1024:.1f} KB{_guarded(best.get('prune_kept'))}")
        print(f"  OMP_NUM_THREADS=1 edgekit build {out / 'best.yaml'} --target {args.target}   # the trial's bytes")
    print(f"trials: {out / 'trials.csv'} (and .json); plot: {out / 'pareto.png'}")
    if best is None:  # the outputs are written; the goal is missed, like a build that misses its fidelity
        raise NothingFeasible(f"no trial fits the budgets, nothing recommended: see {out / 'trials.csv'} for how "
                              "far each one is, then widen search.space, loosen --budget or run more --trials")
    return 0


def _guarded(kept: dict | None) -> str:
    """What the prune stage's accuracy guard kept, when it undid rounds the trial's settings asked for."""
    if not kept or kept.get("round") == kept.get("of"):
        return ""
    what = f"round {kept['round']} of {kept['of']}" if kept["round"] else "the unpruned model"
    return f"; its pruning was undone by the accuracy guard, which kept {what} ({kept['macs_kept']:.0%} of the MACs)"


def _add_search(sub) -> None:
    s = sub.add_parser("search", help="the most accurate model that fits a target's budgets: trials over the "
                                       "config's search: space, on Ray")
    s.add_argument("config", nargs="?", help="YAML config with a search: section (default: the built-in demo)")
    s.add_argument("--target", required=True, action="append", help="target name or profile file (one)")
    s.add_argument("--trials", type=int, help="trials in all (default: search.trials)")
    s.add_argument("--budget", help="latency_ms=5,memory_mb=256,size_kb=500 (default: the target's budgets)")
    s.add_argument("--out", help="search folder (default: runs/search-<timestamp>)")
    s.add_argument("--resume", action="store_true", help="continue the search in --out without repeating "
                                                         "finished trials")
    s.add_argument("--ray-address", help="a Ray cluster to run the trials on (default: Ray embedded here)")
    s.add_argument("--workers", type=int, help="trials at a time (default: this machine's cores)")
    s.add_argument("--no-stage-cache", action="store_true", help="build every stage of every trial, reusing none "
                                                                 "(default: trials reuse the stages they share)")
    s.add_argument("--device-results", nargs="+", metavar="FILE_OR_DIR",
                   help="for a target this machine cannot run and no --host: `edgekit run` results files (in their "
                        "bundle folders) of that target, or folders holding them, to fit the latency and memory "
                        "estimates to")
    _ssh_options(s, "user@host of the device: time each trial's artifact there (after the trials are built)")
    s.set_defaults(func=_cmd_search)


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="edgekit", description="Take a PyTorch model and its data to devices.")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="train, prune, distill, quantize, export, verify, bundle, measure, check, "
                                      "report")
    b.add_argument("config", nargs="?", help="YAML config (default: the built-in digits demo)")
    b.add_argument("--target", action="append", help="target name (repeatable; default: build.targets)")
    b.add_argument("--out", help="build directory (default: runs/<timestamp>)")
    b.add_argument("--resume", metavar="DIR", help="continue an interrupted build from its last finished stage")
    b.add_argument("--allow-fidelity-miss", action="store_true",
                   help="keep going when an artifact misses its fidelity thresholds (recorded in the report)")
    b.set_defaults(func=_cmd_build)
    d = sub.add_parser("debug", help="layer-wise fidelity of an artifact: where int8 loses accuracy")
    d.add_argument("build_dir")
    d.add_argument("--artifact", required=True, help="artifact name, e.g. tflite_int8")
    d.add_argument("--top", type=int, default=10, help="how many layers to show")
    d.set_defaults(func=_cmd_debug)
    r = sub.add_parser("run", help="measure a bundle here, or on a device over SSH (--host), with its runner")
    _run_options(r)
    r.set_defaults(func=_cmd_run)
    _add_compare(sub)
    _add_report(sub)
    _add_docker(sub)
    _add_check(sub)
    _add_search(sub)
    t = sub.add_parser("targets", help="list target profiles, or check a new one")
    t.add_argument("--check", metavar="FILE", help="validate a target YAML file")
    t.set_defaults(func=_cmd_targets)
    c = sub.add_parser("config", help="print the default config, or a config as edgekit reads it")
    c.add_argument("file", nargs="?")
    c.add_argument("--default", action="store_true", help="print the full default config")
    c.set_defaults(func=_cmd_config)
    sens = sub.add_parser("sensitivity", help="accuracy drop when each prunable layer alone is pruned")
    sens.add_argument("config", nargs="?", help="YAML config (default: the built-in digits demo)")
    sens.add_argument("--out", default=".", help="folder for sensitivity.json and sensitivity.png")
    sens.set_defaults(func=_cmd_sensitivity)
    return p


def _interrupted(args: argparse.Namespace) -> str:
    out, search = getattr(args, "build_dir", None), getattr(args, "search_dir", None)
    if search is not None:
        if not (search / "config.yaml").is_file():
            return "edgekit: interrupted before the search started; nothing was written"
        again = args.argv + (["--resume"] if not args.resume else []) + (["--out", str(search)] if not args.out else [])
        return (f"edgekit: interrupted; the finished trials are kept in {search}, continue with "
                f"`edgekit {shlex.join(again)}`")
    if out is None:
        return "edgekit: interrupted"
    if (out / "config.yaml").is_file():
        return f"edgekit: interrupted; continue with `edgekit build --resume {shlex.quote(str(out))}`"
    return "edgekit: interrupted before the build started; nothing was written"


def main(argv: list[str] | None = None) -> int:
    args = argparse.Namespace()
    warnings.filterwarnings("ignore")  # library deprecation chatter is not the user's business
    with stop.handled():  # SIGTERM (timeout, kill, a cancelled job) ends a command as Ctrl-C does
        try:
            args = parser().parse_args(argv)
            args.argv = list(sys.argv[1:] if argv is None else argv)  # for the interrupt message
            if args.command == "config" and not (args.default or args.file):
                args.default = True
            return args.func(args)
        except EdgekitError as exc:
            print(f"edgekit: error: {' '.join(str(exc).split())}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(_interrupted(args), file=sys.stderr)
            return 130
        except OSError as exc:  # a full disk or an unwritable place the checks up front could not foresee
            if exc.errno not in WRITE_ERRORS:
                raise
            where = f" '{exc.filename}'" if exc.filename else ""  # a write to an open file names none
            print(f"edgekit: error: cannot write{where}: {exc.strerror}; {WRITE_ERRORS[exc.errno]}", file=sys.stderr)
            return 2

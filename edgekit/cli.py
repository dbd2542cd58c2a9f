"""Command line: a thin layer over the Python API. Only this module exits."""

from __future__ import annotations

import argparse
import sys
import warnings
from datetime import datetime
from pathlib import Path

from edgekit import quiet
from edgekit.errors import EdgekitError

quiet.setup()  # before anything imports tensorflow


def _cmd_build(args: argparse.Namespace) -> int:
    from edgekit import config, pipeline, report

    if args.resume:
        out = Path(args.resume)
        saved = out / "config.yaml"
        if not saved.is_file():
            raise EdgekitError(f"'{out}' has no config.yaml from an earlier build; nothing to resume")
        cfg = config.load(args.config or saved)
    else:
        cfg = config.load(args.config)
        out = Path(args.out or f"runs/{datetime.now():%Y%m%d-%H%M%S}")
    result = pipeline.build(cfg, out, args.target, resume=bool(args.resume))
    print()
    print(report.summary_table(result))
    print(f"\nreport: {out / 'report.json'}")
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


def _cmd_run(args: argparse.Namespace) -> int:
    from edgekit import measure

    result = measure.run_bundle(Path(args.bundle), Path(args.out) if args.out else None, args.artifact,
                                args.threads)
    print(f"{'artifact':<20} {'runtime':<22} {'acc':>6} {'load ms':>8} {'p50 ms':>7} {'p90 ms':>7} {'RSS MB':>7}")
    for name, r in result["artifacts"].items():
        rt = f"{r['runtime']['name']} {r['runtime']['version']}"
        lat = r["latency_ms"]
        print(f"{name:<20} {rt:<22} {r['accuracy']:>6.3f} {r['load_ms']:>8.1f} {lat['p50']:>7.3f} "
              f"{lat['p90']:>7.3f} {r['peak_rss_mb']:>7.1f}")
    print(f"results: {args.out or Path(args.bundle) / 'results.json'}")
    return 0


def _cmd_targets(args: argparse.Namespace) -> int:
    from edgekit import targets

    if args.check:
        t = targets.load_file(Path(args.check))
        print(f"{args.check}: ok (target '{t.name}', {t.arch}, {len(t.artifacts)} artifacts)")
        return 0
    print(f"{'name':<18} {'arch':<8} {'artifacts (first is primary)':<52} {'threads':>7}  description")
    for t in targets.available().values():
        arts = ", ".join(f"{a.key}@{a.runtime}=={a.runtime_version}" for a in t.artifacts)
        print(f"{t.name:<18} {t.arch:<8} {arts:<52} {t.threads:>7}  {t.description}")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from edgekit import config

    print(config.default_yaml() if args.default else config.dump(config.load(args.file)), end="")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgekit", description="Take a PyTorch model and its data to devices.")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="train, prune, distill, quantize, export, verify and bundle")
    b.add_argument("config", nargs="?", help="YAML config (default: the built-in digits demo)")
    b.add_argument("--target", action="append", help="target name (repeatable; default: build.targets)")
    b.add_argument("--out", help="build directory (default: runs/<timestamp>)")
    b.add_argument("--resume", metavar="DIR", help="continue an interrupted build from its last finished stage")
    b.set_defaults(func=_cmd_build)
    r = sub.add_parser("run", help="measure a bundle on this machine with its runner")
    r.add_argument("bundle")
    r.add_argument("--out", help="results file (default: BUNDLE/results.json)")
    r.add_argument("--artifact", action="append", help="artifact name (repeatable; default: all)")
    r.add_argument("--threads", type=int, help="override the target's thread count")
    r.set_defaults(func=_cmd_run)
    t = sub.add_parser("targets", help="list target profiles, or check a new one")
    t.add_argument("--check", metavar="FILE", help="validate a target YAML file")
    t.set_defaults(func=_cmd_targets)
    c = sub.add_parser("config", help="print the default config, or a config as edgekit reads it")
    c.add_argument("file", nargs="?")
    c.add_argument("--default", action="store_true", help="print the full default config")
    c.set_defaults(func=_cmd_config)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "config" and not (args.default or args.file):
        args.default = True
    warnings.filterwarnings("ignore")  # library deprecation chatter is not the user's business
    try:
        return args.func(args)
    except EdgekitError as exc:
        print(f"edgekit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgekit: interrupted; continue with `edgekit build --resume DIR`", file=sys.stderr)
        return 130

"""Command line: `python -m dplib reproduce [--smoke] [--only NAME] [--device D] [--executor E] [--results DIR]`.

Executes the notebooks headlessly (see `dplib.notebooks.reproduce`), prints one line per notebook,
and exits non-zero when any notebook failed.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dplib", description="dplib: distribution prompting.")
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("reproduce", help="execute every notebook into results/ and write results/index.html")
    rep.add_argument("--smoke", action="store_true",
                     help="tiny parameters (each notebook's metadata dplib.smoke): a quick end-to-end check")
    rep.add_argument("--only", action="append", metavar="NAME",
                     help="run only this notebook (its name or a prefix such as 01); repeatable")
    rep.add_argument("--device", default=None, help="passed to every notebook's `device` (default: its own)")
    rep.add_argument("--executor", default=None, metavar="E",
                     help="where sweep cells run, passed to every notebook's `executor`: local (default) or "
                          "ray (a local Ray, or the cluster at $RAY_ADDRESS)")
    rep.add_argument("--results", default="results", metavar="DIR", help="results root (default: results)")
    rep.add_argument("--notebooks", default=None, metavar="DIR", help="notebook folder (default: notebooks/)")
    rep.add_argument("--cell-timeout", type=int, default=None, metavar="S", help="per-cell time limit in seconds")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from .notebooks import reproduce

    t0 = time.perf_counter()
    try:
        outcomes = reproduce(args.results, smoke=args.smoke, only=args.only, device=args.device,
                             executor=args.executor, notebooks=args.notebooks, cell_timeout=args.cell_timeout)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    failed = [o for o in outcomes if o.status != "success"]
    print(f"\n{len(outcomes)} notebook(s) in {time.perf_counter() - t0:.0f} s; index: {args.results}/index.html")
    for outcome in outcomes:
        print("  " + outcome.describe())
    if failed:
        print(f"{len(failed)} notebook(s) failed: {', '.join(o.name for o in failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

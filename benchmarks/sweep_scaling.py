"""Does a sweep scale over Ray workers, and what does a cell cost beyond its own compute?

The same soft-prompt sweep, in one run (so the numbers share the machine's state), through:
  1. the in-process loop, torch using `--threads` threads (default 2);
  2. a local Ray with 1 worker, 1 thread;
  3. a local Ray with 2 workers, 1 thread each (more with --workers).
Each configuration writes into its own empty cell store, so every cell is computed. Reported per
configuration: wall time of `run_sweep` (Ray's own start is measured once, apart; the workers'
start and model load are inside), cells/s, the mean compute per cell (the optimiser's own
`batch_wall_s`), and the overhead per cell: the worker time that was not compute,
(wall × workers − Σ compute) / cells, in seconds and as a share of a cell's compute — with the
workers' start (process, imports, model load) amortised over the sweep, and without it
(dispatch, transfer, store writes, idle workers at the end).
Issue 13's aim: overhead < 5 % of a cell's compute, so the same code scales on a cluster.

Timings need a quiet machine: on cores shared with other work, every number here moves.

    .venv/bin/python benchmarks/sweep_scaling.py              # smollm2-135m, 16 cells (minutes on 2 cores)
    .venv/bin/python benchmarks/sweep_scaling.py --quick      # tiny random model, 8 short cells (smoke run)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from dplib import runner, targets
from dplib.models import load_model, tiny_model
from dplib.ray_executor import RayExecutor, require_ray


def measure(label, model, tok, grid, methods, batch_size, executor, workers, root) -> dict:
    t0 = time.perf_counter()
    table = runner.run_sweep(model, tok, grid, methods, batch_size=batch_size, store=os.path.join(root, label),
                             executor=executor, progress=False)
    wall = time.perf_counter() - t0
    compute = table.drop_duplicates(["variant", "seed", "batch"])["batch_wall_s"].to_numpy()
    n = len(compute)
    load = getattr(executor, "startup_s", 0.0)  # worker processes started, imports, model loads
    overhead = (wall * workers - compute.sum()) / n
    overhead_no_load = ((wall - load) * workers - compute.sum()) / n
    return {"config": label, "workers": workers, "cells": n, "wall_s": wall, "cells_per_s": n / wall,
            "compute_s": compute.mean(), "overhead_s": overhead, "overhead_pct": 100 * overhead / compute.mean(),
            "load_s": load, "dispatch_s": overhead_no_load, "dispatch_pct": 100 * overhead_no_load / compute.mean()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny random model, short cells: a smoke run")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--targets", type=int, default=32, help="targets in the sweep")
    ap.add_argument("--batch-size", type=int, default=2, help="targets per cell")
    ap.add_argument("--steps", type=int, default=40, help="soft-prompt steps per cell")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the in-process loop")
    ap.add_argument("--workers", type=int, default=2, help="most Ray workers (1 thread each)")
    args = ap.parse_args()
    if args.quick:
        args.targets, args.steps = 8, 10

    ray = require_ray()
    torch.set_num_threads(args.threads)
    if args.quick:
        model, tok = tiny_model(380, arch="llama", seed=0)
    else:
        model, tok = load_model(args.model, device="cpu")
    width = targets.logits_width(model)
    grid = targets.vanilla(width, targets.entropy_grid(width, args.targets).tolist(), seed=0)
    methods = {"soft": {"steps": args.steps, "prompt_length": 5, "patience": 0}}

    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    print(f"local Ray started in {time.perf_counter() - t0:.1f} s (not counted below)")
    rows = []
    with tempfile.TemporaryDirectory() as root:
        rows.append(measure(f"in-process ({args.threads} threads)", model, tok, grid, methods, args.batch_size,
                            None, 1, root))
        for w in range(1, args.workers + 1):
            rows.append(measure(f"ray {w} worker(s) x 1 thread", model, tok, grid, methods, args.batch_size,
                                RayExecutor(num_workers=w, threads=1), w, root))
    ray.shutdown()

    print(f"\n{args.targets} targets, {args.batch_size} per cell, soft {args.steps} steps, "
          f"model {'tiny' if args.quick else args.model}, {os.cpu_count()} CPUs")
    print(f"{'config':32s} {'cells':>5s} {'wall s':>8s} {'cells/s':>8s} {'compute s':>10s} "
          f"{'overhead s':>11s} {'%':>6s} {'start s':>7s} {'no-load s':>10s} {'%':>6s}")
    for r in rows:
        print(f"{r['config']:32s} {r['cells']:5d} {r['wall_s']:8.2f} {r['cells_per_s']:8.3f} {r['compute_s']:10.3f} "
              f"{r['overhead_s']:11.3f} {r['overhead_pct']:6.1f} {r['load_s']:7.2f} {r['dispatch_s']:10.3f} "
              f"{r['dispatch_pct']:6.1f}")
    base = rows[0]["cells_per_s"]
    print("\nthroughput against the in-process loop: "
          + ", ".join(f"{r['config']}: {r['cells_per_s'] / base:.2f}x" for r in rows[1:]))


if __name__ == "__main__":
    main()

"""Sweeps: targets × methods × seeds on one model → one tidy table, stored cell by cell, resumable.

`run_sweep` cuts the targets into fixed batches (in the order given, `batch_size` targets per
optimiser call) and runs every (method, seed, batch) cell through the optimiser registry
(`dplib.optim.METHODS`); it returns one row per target × method × seed. Each cell is keyed by
what determines its result (`dplib.cells.cell_key`: the model's weight fingerprint, method,
config, seed, the batch's target ids and probabilities) and kept in the cell store
(`dplib.store`, by default `results/cells/`, shared by every run and notebook). A sweep first
reads the cells the store already has and computes only the others, so a run killed mid-way
loses at most the cells in flight, and any sweep that shares cells with an earlier one — another
notebook, the same notebook with other analysis parameters, a subset or a superset — reuses them.

Where cells run is the `executor`'s business (`dplib.executors`): in this process by default, or
on Ray workers (`executor="ray"`). Either way this process is the only writer: it stores each
cell as it finishes and writes the run's tables and run.json. A cell that keeps failing is
retried `retries` times, then reported with status "failed" in the table (and the sweep raises
`SweepError` unless `allow_failed=True`).

Seeds: the optimiser of a cell gets `config.seed = derive_seed(seed, method)`, and every optimiser
derives each target's own generator from (config.seed, target_id), so a target's result depends on
(base seed, target id, method) only — not on which targets share its batch, nor on the batch size.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pandas as pd

from . import lm
from .cells import CellTask, cell_key, is_bound_method, probs_fingerprint, registry, result_rows
from .executors import DEFAULT_RETRIES, make_executor
from .methods import MethodSpec, make_config, method_specs
from .results import Run, stable_hash, to_jsonable
from .store import CellStore, store_for
from .targets import Targets

log = logging.getLogger(__name__)

SWEEP_COLUMNS = frozenset({"run_id", "sweep", "model", "method", "variant", "is_bound", "seed", "batch", "status", "error", "kl_nats", "initial_kl_nats", "improvement_nats", "projected_kl_nats", "steps", "wall_s",
                           "batch_wall_s", "prompt_text", "prompt_text_exact", "prompt_ids"})
DEFAULT_BATCH_SIZE = 32  # targets per optimiser call: near the CPU's efficient batch (docs/performance.md)


# --------------------------------------------------------------------------------------------
# Batches and their identity.
# --------------------------------------------------------------------------------------------


def batches(n: int, batch_size: int) -> list[range]:
    """Consecutive index ranges of at most `batch_size`, covering 0..n-1 (deterministic)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    return [range(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


fingerprint = probs_fingerprint  # the name this module has always exported


def model_name_of(model) -> str:
    return str(getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", "") or
               type(model).__name__)


@dataclass(frozen=True)
class Cell:
    """One planned cell of a sweep: its labels (spec, seed, batch index) and what it computes."""

    index: int
    spec: MethodSpec
    seed: int
    config: object
    batch_index: int
    batch: Targets
    key: str


def plan_cells(model_fingerprint: str, targets: Targets, specs: Sequence[MethodSpec], seeds: Sequence[int],
               batch_size: int) -> list[Cell]:
    """Every (method, seed, batch) cell of a sweep, in table order (method as given, seed, batch)."""
    cells = []
    for spec in specs:
        for seed in seeds:
            config = make_config(spec, seed)
            for b, rows in enumerate(batches(len(targets), batch_size)):
                batch = targets[list(rows)]
                key = cell_key(model_fingerprint, spec.method, config, seed, batch)
                cells.append(Cell(len(cells), spec, seed, config, b, batch, key))
    return cells


# --------------------------------------------------------------------------------------------
# A cell's rows, labelled for one sweep.
# --------------------------------------------------------------------------------------------


def label_rows(rows: pd.DataFrame, batch: Targets, spec: MethodSpec, *, seed: int, model_name: str,
               sweep: str, batch_index: int, run_id: str | None, status: str = "ok",
               error: str | None = None) -> pd.DataFrame:
    """A cell's stored rows (`cells.result_rows`) with this sweep's labels and the targets' metadata.

    The labels (run, sweep, model name, variant, batch index) and the metadata are not part of the
    cell's key, so they come from the sweep that reads the cell, never from the one that stored it.
    A failed cell has rows holding only target_id (and is_bound); its metrics are left missing.
    """
    meta = batch.frame()
    # target metadata that would clash with the sweep's own columns gets a prefix (seed → target_seed,
    # the sampler's method → target_method)
    meta = meta.rename(columns={c: f"target_{c}" for c in meta.columns if c in SWEEP_COLUMNS})
    if meta["target_id"].tolist() != rows["target_id"].tolist():
        raise RuntimeError(f"cell rows for targets {rows['target_id'].tolist()[:5]} do not match the batch "
                           f"{meta['target_id'].tolist()[:5]}: the cell store holds another batch under this key")
    n = len(rows)
    df = pd.DataFrame({"run_id": run_id, "sweep": sweep, "model": model_name, "method": spec.method,
                       "variant": spec.name, "is_bound": rows["is_bound"].to_numpy(), "seed": seed,
                       "batch": batch_index, "status": status},
                      index=range(n))
    df = pd.concat([df, meta.reset_index(drop=True),
                    rows.drop(columns=["target_id", "is_bound"]).reset_index(drop=True)], axis=1)
    df["error"] = error
    return df


def label_trace(trace: pd.DataFrame, spec: MethodSpec, *, seed: int, run_id: str | None,
                sweep: str) -> pd.DataFrame:
    """A cell's stored trace with this sweep's labels (run_id, sweep, variant, seed)."""
    trace = trace.copy()
    trace.insert(0, "run_id", run_id)
    trace.insert(1, "sweep", sweep)
    trace.insert(3, "variant", spec.name)
    trace.insert(4, "seed", seed)
    return trace


def cell_frame(result, batch: Targets, spec: MethodSpec, config, *, seed: int, model_name: str,
               sweep: str, batch_index: int, run_id: str | None) -> pd.DataFrame:
    """One row per target of a finished optimiser call, with target metadata and every metric."""
    return label_rows(result_rows(result, batch, config), batch, spec, seed=seed, model_name=model_name,
                      sweep=sweep, batch_index=batch_index, run_id=run_id)


# --------------------------------------------------------------------------------------------
# The sweep.
# --------------------------------------------------------------------------------------------


@dataclass
class SweepStats:
    """What a sweep call did: cells computed now, read back from the store, and failed (after retries)."""

    computed: int = 0
    reused: int = 0
    failed: int = 0
    wall_s: float = 0.0


class SweepError(RuntimeError):
    """Cells of a sweep failed after their retries. `table` holds every row, the failed cells' with
    status "failed" and their error; the finished cells are stored, so a re-run computes only the others."""

    def __init__(self, message: str, table: pd.DataFrame):
        super().__init__(message)
        self.table = table


def run_sweep(model, tokenizer, targets: Targets, methods, *, seeds: Sequence[int] | int = (0,),
              batch_size: int = DEFAULT_BATCH_SIZE, run: Run | None = None, name: str = "sweep",
              model_name: str | None = None, progress: bool = True,
              store: CellStore | str | os.PathLike | None = None, executor=None,
              retries: int = DEFAULT_RETRIES, model_spec=None, allow_failed: bool = False) -> pd.DataFrame:
    """Run every target × method × seed; return one tidy row per cell target.

    Args:
        model, tokenizer: the frozen LM (all cells run on it, or on workers' copies of it).
        targets: T targets over the model's logits width.
        methods: see `method_specs` (registry names, each with config parameters).
        seeds: base seeds; each is one replicate of the whole sweep.
        batch_size: targets per optimiser call (the last batch may be smaller).
        run: the run directory; None keeps the table in memory (no run.json, no tables).
        name: the sweep's name within the run (tables/<name>.csv, tables/<name>_trace.parquet,
            tables/<name>_cells.csv, run.json "sweeps"/<name>).
        model_name: recorded in the `model` column (default: the model's name_or_path); the cell
            identity uses the model's fingerprint (`lm.fingerprint`), not its name.
        store: the cell store (a `CellStore` or a folder); None: `<results root>/cells` of `run`,
            or no store (nothing reused, nothing kept) without a run.
        executor: where cells run: None or "local" (this process), "ray" (Ray workers: a local Ray,
            or the cluster at $RAY_ADDRESS), "ray:<address>", or an executor object such as
            `dplib.ray_executor.RayExecutor(num_workers=4, num_gpus=1)`.
        retries: extra attempts of a cell that raises (or whose worker dies) before it is failed.
        model_spec: how remote workers load the model (`dplib.executors.ModelSpec`); None: read from
            the model (`ModelSpec.of`: models from `dplib.load_model` and `dplib.tiny_model`).
        allow_failed: return a table with failed cells (status "failed") instead of raising.
    Returns: columns run_id, sweep, model, method, variant, is_bound, seed, batch, status ("ok" or
        "failed"), the target metadata (target_id, kind, ...; names that clash get a `target_`
        prefix: target_seed, target_method), entropy_nats, kl_nats,
        initial_kl_nats, improvement_nats (initial − best; ≈ 0: the optimiser did not move the target),
        projected_kl_nats (soft only, else NaN), reverse_kl_nats, js_nats, tv,
        top1_agree, top10_recall, steps, wall_s (this target's share of its batch, seconds, measured
        when the cell was computed), batch_wall_s, prompt_text (None where no text reproduces the
        prompt's ids), prompt_text_exact, prompt_ids (space-separated; None for bounds), cfg_<field>
        per config field, error (None, or why a failed cell failed).
        Row order: method (as given), seed, target (as given). `table.attrs["stats"]`: the sweep's
        `SweepStats` (cells computed, reused from the store, failed; wall seconds).
    Raises:
        SweepError: cells failed after their retries (unless `allow_failed`); its `table` has all rows.
    """
    specs = method_specs(methods)
    seeds = [seeds] if isinstance(seeds, int) else list(seeds)
    if retries < 0:
        raise ValueError(f"retries must be ≥ 0, got {retries}")
    targets.check_width(model)
    model_name = model_name or model_name_of(model)
    model_fp = lm.fingerprint(model)
    run_id = run.run_id if run is not None else None
    stats = SweepStats()
    store = store_for(run, store)
    executor = make_executor(executor)
    t0 = time.perf_counter()

    cells = plan_cells(model_fp, targets, specs, seeds, batch_size)
    if run is not None:
        run.record("sweeps", name, {
            "model": model_name, "seeds": seeds, "batch_size": batch_size, "n_targets": len(targets),
            "methods": {s.name: {"method": s.method, "config": make_config(s, seeds[0])} for s in specs},
            "model_fingerprint": model_fp,
            "sweep_id": stable_hash({"model": model_fp, "seeds": seeds, "batch_size": batch_size,
                                     "methods": [(s.name, s.method, to_jsonable(s.params)) for s in specs],
                                     "targets": fingerprint(targets.probs)}),
            "store": str(store.root.resolve()) if store is not None else None,
            "executor": executor.describe(), "n_cells": len(cells), "cells_table": f"tables/{name}_cells.csv",
            "status": "running"})

    # What the store has is read; each distinct key left is computed once (two variants with equal
    # configs are one cell).
    found: dict[str, tuple[pd.DataFrame, pd.DataFrame]] = {}
    origin: dict[str, str] = {}
    for cell in cells:
        got = store.get(cell.key) if store is not None and cell.key not in found else None
        if got is not None:
            found[cell.key], origin[cell.key] = got, "reused"
    todo = {c.key: c for c in cells if c.key not in found}
    stats.reused += len({c.key for c in cells} - set(todo))
    if run is not None:
        run.save_table(cells_frame(cells, origin, {}, {}), f"{name}_cells", "csv")
    log.info("sweep %s: %d cells, %d in the store, %d to compute", name, len(cells), len(cells) - len(todo),
             len(todo))

    failures: dict[str, tuple[str, int]] = {}
    attempts: dict[str, int] = {}
    from tqdm.auto import tqdm

    tasks = [CellTask(c.index, c.key, c.spec.method, c.config, c.batch) for c in todo.values()]
    with tqdm(total=len(tasks), desc=f"sweep {name}", disable=not progress) as bar:
        for outcome in executor.run(model, tokenizer, tasks, retries=retries, model_spec=model_spec):
            key = outcome.task.key
            attempts[key] = outcome.attempts
            if outcome.ok:
                out = outcome.output
                if store is not None:  # at once: a killed driver loses only the cells in flight
                    store.put(key, out.rows, out.trace)
                found[key], origin[key] = (out.rows, out.trace), "computed"
                stats.computed += 1
                log.info("sweep %s: cell %d (%s) done in %.1f s on %s", name, outcome.task.index,
                         outcome.task.method, out.wall_s, out.worker)
            else:
                failures[key] = (outcome.error, outcome.attempts)
                stats.failed += 1
            bar.update()
    missing = [c for c in todo.values() if c.key not in found and c.key not in failures]
    if missing:
        raise RuntimeError(f"the executor returned no outcome for {len(missing)} cells (e.g. cell "
                           f"{missing[0].index}); this is a bug in {type(executor).__name__}")

    frames, traces = [], []
    for cell in cells:
        labels = dict(seed=cell.seed, run_id=run_id, sweep=name)
        if cell.key in found:
            rows, trace = found[cell.key]
            frames.append(label_rows(rows, cell.batch, cell.spec, model_name=model_name,
                                     batch_index=cell.batch_index, **labels))
            traces.append(label_trace(trace, cell.spec, **labels))
        else:
            rows = pd.DataFrame({"target_id": cell.batch.ids, "is_bound": is_bound_method(cell.spec.method)})
            frames.append(label_rows(rows, cell.batch, cell.spec, model_name=model_name,
                                     batch_index=cell.batch_index, status="failed",
                                     error=failures[cell.key][0], **labels))
    table = pd.concat(frames, ignore_index=True)
    trace_table = pd.concat(traces, ignore_index=True) if traces else pd.DataFrame()
    table.attrs["stats"] = stats
    stats.wall_s = time.perf_counter() - t0
    if run is not None:
        run.save_table(table, name, "csv")
        if not trace_table.empty:
            run.save_table(trace_table, f"{name}_trace", "parquet")
        run.save_table(cells_frame(cells, origin, attempts, failures), f"{name}_cells", "csv")
        meta = run.meta["sweeps"][name]
        meta.update(status="failed" if failures else "success", cells_computed=stats.computed,
                    cells_reused=stats.reused, cells_failed=stats.failed, wall_s=round(stats.wall_s, 3))
        run.record("sweeps", name, meta)
    log.info("sweep %s: %d cells computed, %d reused, %d failed, %.1f s", name, stats.computed, stats.reused,
             stats.failed, stats.wall_s)
    if failures and not allow_failed:
        key, (error, n) = next(iter(failures.items()))
        raise SweepError(f"sweep {name!r}: {len(failures)} of {len(todo)} computed cells failed after "
                         f"{n} attempts (first: {todo[key].spec.name}, seed {todo[key].seed}, batch "
                         f"{todo[key].batch_index}: {error}). The other cells are stored; re-run to retry "
                         "the failed ones, or pass allow_failed=True to get the table with their status.",
                         table)
    return table


def cells_frame(cells: Sequence[Cell], origin: Mapping, attempts: Mapping, failures: Mapping) -> pd.DataFrame:
    """The run's record of the cells a sweep uses: one row per cell with its key in the store.

    Columns: key, variant, method, seed, batch, n_targets, status ("ok", "failed" or "pending":
    not finished when this was written), origin ("computed" now, "reused" from the store, or None),
    attempts (None for reused cells), error.
    """
    rows = []
    for c in cells:
        status = "ok" if c.key in origin else "failed" if c.key in failures else "pending"
        rows.append({"key": c.key, "variant": c.spec.name, "method": c.spec.method, "seed": c.seed,
                     "batch": c.batch_index, "n_targets": len(c.batch), "status": status,
                     "origin": origin.get(c.key), "attempts": attempts.get(c.key),
                     "error": failures[c.key][0] if c.key in failures else None})
    return pd.DataFrame(rows)


def run_methods(model, tokenizer, targets: Targets, methods, *, seed: int = 0,
                progress: bool = True) -> dict:
    """Run each method once on all `targets` (one optimiser call each, in memory); {label: Result}.

    Configs get the same per-cell seeds as `run_sweep`. For small interactive runs (the quickstart,
    the playground) where the Results themselves — log-probabilities, prompts — are wanted.
    """
    methods_fn, _ = registry()
    return {spec.name: methods_fn[spec.method](model, tokenizer, targets, make_config(spec, seed),
                                               progress=progress)
            for spec in method_specs(methods)}


def results_table(found: Mapping, targets: Targets, *, seed: int = 0, model_name: str = "",
                  run: Run | None = None, name: str = "results") -> pd.DataFrame:
    """The tidy table of `{label: Result}` (as `run_methods` returns), in `run_sweep`'s columns.

    With `run`, it is also saved as tables/<name>.csv.
    """
    frames = []
    for label, result in found.items():
        spec = MethodSpec(result.method, {}, label)
        config_dict = result.meta.get("config")
        cls = registry()[1].get(result.method)
        config = cls(**config_dict) if cls is not None and config_dict is not None else None
        frames.append(cell_frame(result, targets, spec, config, seed=seed, model_name=model_name, sweep=name,
                                 batch_index=0, run_id=run.run_id if run is not None else None))
    table = pd.concat(frames, ignore_index=True)
    if run is not None:
        run.save_table(table, name, "csv")
    return table

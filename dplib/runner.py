"""Sweeps: targets × methods × seeds on one model → one tidy table, saved batch by batch, resumable.

`run_sweep` cuts the targets into fixed batches (in the order given, `batch_size` targets per
optimiser call), runs every (method, seed, batch) cell through the optimiser registry
(`dplib.optim.METHODS`), and returns one row per target × method × seed. With a run directory
(`dplib.results.Run`) every finished cell is written at once as a parquet shard under
`shards/<sweep>/`, named by a hash of everything that determines its result (model, method,
config, seed, the batch's target ids and probabilities; the model by the fingerprint of its weights). A re-run finds the shard and reads it
instead of recomputing, so a run killed mid-way loses at most the batch in flight, and any sweep
that shares cells with an earlier one (a subset, a superset) reuses them.

Seeds: the optimiser of a cell gets `config.seed = derive_seed(seed, method)`, and every optimiser
derives each target's own generator from (config.seed, target_id), so a target's result depends on
(base seed, target id, method) only — not on which targets share its batch, nor on the batch size.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from . import lm, metrics
from .results import Run, read_frame, stable_hash, to_jsonable, write_frame
from .seeds import derive_seed
from .targets import Targets

log = logging.getLogger(__name__)

SWEEP_COLUMNS = frozenset({"run_id", "sweep", "model", "method", "variant", "is_bound", "seed", "batch", "kl_nats", "initial_kl_nats", "improvement_nats", "projected_kl_nats", "steps", "wall_s",
                           "batch_wall_s", "prompt_text", "prompt_text_exact", "prompt_ids"})
DEFAULT_BATCH_SIZE = 32  # targets per optimiser call: near the CPU's efficient batch (PERF_NOTES)


# --------------------------------------------------------------------------------------------
# Method specifications.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodSpec:
    """One column of a sweep: a registry method, its config parameters, and its label.

    method: the registry name ("soft", "hard", "free_bound", "norm_bound", "layer_bound").
    params: config field overrides (plain values), applied to the method's config class.
    label: the `variant` column (default: the method name); lets one method appear with several
        configs in a sweep, e.g. {"soft_L1": ("soft", {"n_prompt": 1}), "soft_L10": ...}.
    """

    method: str
    params: Mapping = field(default_factory=dict)
    label: str | None = None

    @property
    def name(self) -> str:
        return self.label or self.method


def method_specs(methods) -> list[MethodSpec]:
    """Normalise the accepted forms of `methods` into MethodSpecs.

    Accepted: "soft"; ["soft", "free_bound"]; {"soft": {"steps": 100}, "free_bound": {}};
    {"soft_L10": ("soft", {"n_prompt": 10})}; a config instance as the value; MethodSpecs.
    """
    if isinstance(methods, str | MethodSpec):
        methods = [methods]
    specs = []
    if isinstance(methods, Mapping):
        for label, value in methods.items():
            if isinstance(value, tuple):
                method, params = value
            else:
                method, params = label, value
            specs.append(MethodSpec(method, params if params is not None else {}, label))
    else:
        for item in methods:
            if isinstance(item, MethodSpec):
                specs.append(item)
            elif isinstance(item, str):
                specs.append(MethodSpec(item, {}, item))
            elif isinstance(item, tuple) and len(item) in (2, 3):
                specs.append(MethodSpec(item[0], item[1], item[2] if len(item) == 3 else item[0]))
            else:
                raise TypeError(f"cannot read method spec {item!r}: use a name, (name, params) or MethodSpec")
    labels = [s.name for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"method labels must be unique, got {labels}; give variants distinct labels")
    if not specs:
        raise ValueError("methods is empty: name at least one method, e.g. ['soft', 'free_bound']")
    return specs


def _registry():
    from . import optim

    methods, configs = getattr(optim, "METHODS", {}), getattr(optim, "CONFIGS", {})
    return methods, configs


def make_config(spec: MethodSpec, seed: int):
    """The config instance of one cell: the spec's params, with the cell seed where the config has one."""
    methods, configs = _registry()
    if spec.method not in methods:
        raise KeyError(f"unknown method {spec.method!r}; registered: {sorted(methods)}")
    params = spec.params
    cls = configs.get(spec.method)
    if dataclasses.is_dataclass(params) and not isinstance(params, type):
        config = params
    elif cls is None:
        if params:
            raise ValueError(f"method {spec.method!r} has no config class; cannot apply {dict(params)}")
        return None
    else:
        config = cls(**dict(params))
    if any(f.name == "seed" for f in dataclasses.fields(config)):
        config = dataclasses.replace(config, seed=derive_seed(seed, spec.method))
    return config


# --------------------------------------------------------------------------------------------
# Batches and their identity.
# --------------------------------------------------------------------------------------------


def batches(n: int, batch_size: int) -> list[range]:
    """Consecutive index ranges of at most `batch_size`, covering 0..n-1 (deterministic)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    return [range(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def fingerprint(probs: torch.Tensor) -> str:
    """A hash of a batch of target distributions (float32 bytes)."""
    data = probs.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def model_name_of(model) -> str:
    return str(getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", "") or
               type(model).__name__)


def cell_key(model_fingerprint: str, spec: MethodSpec, config, seed: int, batch: Targets) -> str:
    """The identity of one (method, seed, batch) cell: equal keys, equal results.

    model_fingerprint: `lm.fingerprint(model)`, a hash of the weights, dtype and config (never the
    model's name: in-memory models, bf16 copies and edited weights share names).
    """
    return stable_hash({"model": model_fingerprint, "method": spec.method, "config": config, "seed": seed,
                        "targets": batch.ids, "probs": fingerprint(batch.probs)}, 16)


# --------------------------------------------------------------------------------------------
# One cell → tidy rows.
# --------------------------------------------------------------------------------------------


def is_bound_method(method: str, result=None) -> bool:
    """Whether a method's rows are bounds (drawn as lines): the *_bound methods, or `meta["is_bound"]`.

    By name too, because a bound under soft-capped logits is a local optimum (`is_bound` False in its
    meta, `certified` False) yet still plays the bound's role in the figures.
    """
    return method.endswith("_bound") or bool(getattr(result, "meta", {}).get("is_bound", False))



def cell_frame(result, batch: Targets, spec: MethodSpec, config, *, seed: int, model_name: str,
               sweep: str, batch_index: int, run_id: str | None) -> pd.DataFrame:
    """One row per target of a finished optimiser call, with target metadata and every metric."""
    res = result.to_frame().rename(columns={"wall_s": "batch_wall_s"})
    n = len(res)
    summ = metrics.summary(batch.probs.to(result.logprobs.device), result.logprobs)
    meta = batch.frame()
    # target metadata that would clash with the sweep's own columns gets a prefix (seed → target_seed,
    # the sampler's method → target_method)
    meta = meta.rename(columns={c: f"target_{c}" for c in meta.columns if c in SWEEP_COLUMNS})
    if meta["target_id"].tolist() != res["target_id"].tolist():
        raise RuntimeError(f"{spec.method} returned targets {res['target_id'].tolist()[:5]} but the batch "
                           f"holds {meta['target_id'].tolist()[:5]}: Result.target_ids must keep the input order")
    df = pd.DataFrame({"run_id": run_id, "sweep": sweep, "model": model_name, "method": spec.method,
                       "variant": spec.name, "is_bound": is_bound_method(spec.method, result),
                       "seed": seed, "batch": batch_index},
                      index=range(n))
    df = pd.concat([df, meta.reset_index(drop=True)], axis=1)
    df["kl_nats"] = res["kl_nats"].to_numpy()
    df["initial_kl_nats"] = res["initial_kl_nats"].to_numpy()
    df["improvement_nats"] = res["improvement_nats"].to_numpy()
    df["projected_kl_nats"] = res["projected_kl_nats"].to_numpy() if "projected_kl_nats" in res else float("nan")
    for name, values in summ.items():
        if name != "kl_nats":  # the optimiser's own best KL is the one reported
            df[name] = values.detach().double().cpu().numpy()
    df["steps"] = res["steps"].to_numpy()
    df["wall_s"] = result.wall_s / max(n, 1)  # this target's share of the batch's wall time
    df["batch_wall_s"] = result.wall_s
    df["prompt_text"] = res["prompt_text"].to_numpy() if "prompt_text" in res else None
    df["prompt_text_exact"] = res["prompt_text_exact"].to_numpy() if "prompt_text_exact" in res else None
    ids = result.prompt_ids
    df["prompt_ids"] = [" ".join(map(str, r)) for r in ids.tolist()] if ids is not None else None
    for key, value in (dataclasses.asdict(config) if config is not None else {}).items():
        if key != "seed":
            value = to_jsonable(value)
            df[f"cfg_{key}"] = str(value) if isinstance(value, list | dict) else value
    return df


def _trace_frame(result, spec: MethodSpec, seed: int, run_id, sweep: str) -> pd.DataFrame:
    trace = result.trace_frame()
    trace.insert(0, "run_id", run_id)
    trace.insert(1, "sweep", sweep)
    trace.insert(3, "variant", spec.name)
    trace.insert(4, "seed", seed)
    return trace


# --------------------------------------------------------------------------------------------
# The sweep.
# --------------------------------------------------------------------------------------------


@dataclass
class SweepStats:
    """What a sweep call did: cells computed now vs read back from finished shards."""

    computed: int = 0
    reused: int = 0
    wall_s: float = 0.0


def run_sweep(model, tokenizer, targets: Targets, methods, *, seeds: Sequence[int] | int = (0,),
              batch_size: int = DEFAULT_BATCH_SIZE, run: Run | None = None, name: str = "sweep",
              model_name: str | None = None, progress: bool = True,
              stats: SweepStats | None = None) -> pd.DataFrame:
    """Run every target × method × seed; return one tidy row per cell target.

    Args:
        model, tokenizer: the frozen LM (all cells run on it).
        targets: T targets over the model's logits width.
        methods: see `method_specs` (registry names, each with config parameters).
        seeds: base seeds; each is one replicate of the whole sweep.
        batch_size: targets per optimiser call (the last batch may be smaller).
        run: the run directory; None keeps everything in memory (no resume).
        name: the sweep's name within the run (shards/<name>/, tables/<name>.csv,
            tables/<name>_trace.parquet, run.json "sweeps"/<name>).
        model_name: recorded in the `model` column (default: the model's name_or_path); the cell
            identity uses the model's fingerprint (`lm.fingerprint`), not its name.
        stats: filled with the number of cells computed and reused.
    Returns: columns run_id, sweep, model, method, variant, is_bound, seed, batch, the
        target metadata (target_id, kind, ...; names that clash get a `target_` prefix:
        target_seed, target_method), entropy_nats, kl_nats,
        initial_kl_nats, improvement_nats (initial − best; ≈ 0: the optimiser did not move the target),
        projected_kl_nats (soft only, else NaN), reverse_kl_nats, js_nats, tv,
        top1_agree, top10_recall, steps, wall_s (this target's share of its batch), batch_wall_s,
        prompt_text (None where no text reproduces the prompt's ids), prompt_text_exact, prompt_ids
        (space-separated; None for bounds), cfg_<field> per config field.
        Row order: method (as given), seed, target (as given).
    """
    methods_fn, _ = _registry()
    specs = method_specs(methods)
    seeds = [seeds] if isinstance(seeds, int) else list(seeds)
    targets.check_width(model)
    model_name = model_name or model_name_of(model)
    model_fp = lm.fingerprint(model)
    run_id = run.run_id if run is not None else None
    stats = stats if stats is not None else SweepStats()
    shard_dir = run.path / "shards" / name if run is not None else None
    t0 = time.perf_counter()

    cells = []
    for spec in specs:
        for seed in seeds:
            config = make_config(spec, seed)
            for b, rows in enumerate(batches(len(targets), batch_size)):
                cells.append((spec, seed, config, b, targets[list(rows)]))
    if run is not None:
        run.record("sweeps", name, {
            "model": model_name, "seeds": seeds, "batch_size": batch_size, "n_targets": len(targets),
            "methods": {s.name: {"method": s.method, "config": make_config(s, seeds[0])} for s in specs},
            "model_fingerprint": model_fp,
            "sweep_id": stable_hash({"model": model_fp, "seeds": seeds, "batch_size": batch_size,
                                     "methods": [(s.name, s.method, to_jsonable(s.params)) for s in specs],
                                     "targets": fingerprint(targets.probs)}),
            "status": "running"})

    frames, traces = [], []
    from tqdm.auto import tqdm

    for spec, seed, config, b, batch in tqdm(cells, desc=f"sweep {name}", disable=not progress):
        key = cell_key(model_fp, spec, config, seed, batch)
        stem = f"{spec.name}__s{seed}__b{b:04d}__{key}"
        path = shard_dir / f"{stem}.parquet" if shard_dir is not None else None
        if path is not None and path.exists():
            df = read_frame(path)
            df["run_id"] = run_id
            trace_path = shard_dir / f"{stem}.trace.parquet"
            trace = read_frame(trace_path) if trace_path.exists() else None
            stats.reused += 1
            log.info("sweep %s: reused finished batch %s", name, path.name)
        else:
            result = methods_fn[spec.method](model, tokenizer, batch, config, progress=False)
            df = cell_frame(result, batch, spec, config, seed=seed, model_name=model_name, sweep=name,
                            batch_index=b, run_id=run_id)
            trace = _trace_frame(result, spec, seed, run_id, name)
            if path is not None:
                # the trace first: a shard's summary file is the mark of a finished batch
                write_frame(trace, shard_dir / f"{stem}.trace.parquet")
                write_frame(df, path)
            stats.computed += 1
            log.info("sweep %s: %s seed %d batch %d done in %.1f s", name, spec.name, seed, b, result.wall_s)
        frames.append(df)
        if trace is not None:
            traces.append(trace)

    table = pd.concat(frames, ignore_index=True)
    trace_table = pd.concat(traces, ignore_index=True) if traces else pd.DataFrame()
    stats.wall_s = time.perf_counter() - t0
    if run is not None:
        run.save_table(table, name, "csv")
        if not trace_table.empty:
            run.save_table(trace_table, f"{name}_trace", "parquet")
        meta = run.meta["sweeps"][name]
        meta.update(status="success", batches_computed=stats.computed, batches_reused=stats.reused,
                    wall_s=round(stats.wall_s, 3))
        run.record("sweeps", name, meta)
    log.info("sweep %s: %d cells computed, %d reused, %.1f s", name, stats.computed, stats.reused, stats.wall_s)
    return table


def run_methods(model, tokenizer, targets: Targets, methods, *, seed: int = 0,
                progress: bool = True) -> dict:
    """Run each method once on all `targets` (one optimiser call each, in memory); {label: Result}.

    Configs get the same per-cell seeds as `run_sweep`. For small interactive runs (the quickstart,
    the playground) where the Results themselves — log-probabilities, prompts — are wanted.
    """
    methods_fn, _ = _registry()
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
        cls = _registry()[1].get(result.method)
        config = cls(**config_dict) if cls is not None and config_dict is not None else None
        frames.append(cell_frame(result, targets, spec, config, seed=seed, model_name=model_name, sweep=name,
                                 batch_index=0, run_id=run.run_id if run is not None else None))
    table = pd.concat(frames, ignore_index=True)
    if run is not None:
        run.save_table(table, name, "csv")
    return table


def load_sweep(run: Run, name: str = "sweep") -> pd.DataFrame:
    """The rows of every finished shard of a sweep (also of one still running or killed)."""
    shard_dir = Path(run.path) / "shards" / name
    paths = sorted(p for p in shard_dir.glob("*.parquet") if not p.name.endswith(".trace.parquet"))
    return pd.concat([read_frame(p) for p in paths], ignore_index=True) if paths else pd.DataFrame()

"""One sweep cell: a (method, config, seed, batch of targets) on one model — its key and its result.

A cell is the unit every executor runs and the cell store keeps. Its key (`cell_key`) is the
identity of what it computes: the model's weight fingerprint, the method, the full config (the
derived cell seed included), the base seed, and the batch's target ids and probabilities. Equal
keys, equal results; anything else (the sweep's name, the variant label, the run, the batch's
index, the targets' metadata) is a label that `dplib.runner` attaches when it reads the cell, so
one stored cell serves every sweep, run and notebook that needs it.

`compute_cell` is what a worker does with a cell: call the optimiser from the registry and turn
its Result into `rows` (one per target: the metrics, prompts, config) and `trace` (per step). Both
are plain DataFrames, so a cell's output crosses a process boundary as it is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import socket
import time
from dataclasses import dataclass

import pandas as pd
import torch

from . import metrics
from .results import stable_hash, to_jsonable
from .targets import Targets

# Characters of the cell key: 128 bits, so that a store shared by every run never confuses two cells.
KEY_CHARS = 32


def registry():
    """(methods, configs): the optimiser registry, {name: function} and {name: config class}."""
    from . import optim

    return optim.METHODS, optim.CONFIGS


def revision(method: str) -> int:
    """The method's revision (`optim.REVISIONS`; 1 where absent): part of its cells' keys from 2 on."""
    from . import optim

    return optim.REVISIONS.get(method, 1)


def probs_fingerprint(probs: torch.Tensor) -> str:
    """A hash of a batch of target distributions (their float32 bytes)."""
    data = probs.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def cell_key(model_fingerprint: str, method: str, config, seed: int, batch: Targets) -> str:
    """The identity of one cell: equal keys, equal results.

    model_fingerprint: `lm.fingerprint(model)`, a hash of the weights, dtype and config (never the
    model's name: in-memory models, bf16 copies and edited weights share names). A method whose
    algorithm changed (`optim.REVISIONS`) gets new keys: its older cells are recomputed, not served.
    """
    identity = {"model": model_fingerprint, "method": method, "config": config, "seed": seed,
                "targets": batch.ids, "probs": probs_fingerprint(batch.probs)}
    if revision(method) > 1:  # only then: revision-1 keys (every cell stored before revisions) stay valid
        identity["revision"] = revision(method)
    return stable_hash(identity, KEY_CHARS)


def is_bound_method(method: str, result=None) -> bool:
    """Whether a method's rows are bounds (drawn as lines): the methods in `optim.BOUNDS`, or `meta["is_bound"]`.

    By method, not only by meta: under soft-capped logits a free or norm bound is a local optimum
    (`is_bound` False in its meta, `certified` False) yet still plays the bound's role in the figures.
    Not by name: `layer_bound` is a prompt-like optimiser whose optimum is local, drawn as a method.
    """
    from . import optim

    return method in optim.BOUNDS or bool(getattr(result, "meta", {}).get("is_bound", False))


@dataclass(frozen=True)
class CellTask:
    """What a worker needs to compute one cell (plain values and a Targets batch: picklable).

    index: the cell's position in the sweep (how the driver puts results back in order).
    key: `cell_key` of the cell.
    method: the registry name; config: its config instance (None for a method without one).
    batch: the targets, in the sweep's order.
    """

    index: int
    key: str
    method: str
    config: object
    batch: Targets


@dataclass
class CellOutput:
    """A computed cell. rows: one per target (see `result_rows`); trace: the optimiser's per-step
    trace (target_id, method, step, kl_nats); wall_s: seconds the optimiser call took; worker: where
    it ran ("host:pid")."""

    key: str
    rows: pd.DataFrame
    trace: pd.DataFrame
    wall_s: float
    worker: str


def result_rows(result, batch: Targets, config) -> pd.DataFrame:
    """The part of a cell's table that its key determines: one row per target, in batch order.

    Columns: target_id, is_bound, kl_nats, initial_kl_nats, improvement_nats, projected_kl_nats
    (NaN where the method has none), the metrics of `metrics.summary` other than KL (reverse_kl_nats,
    js_nats, tv, top1_agree, top10_recall), steps, wall_s (this target's share of the call, seconds),
    batch_wall_s, prompt_text, prompt_text_exact, prompt_ids, cfg_<field> per config field but seed.
    """
    res = result.to_frame()
    if res["target_id"].tolist() != batch.ids:
        raise RuntimeError(f"{result.method} returned targets {res['target_id'].tolist()[:5]} but the batch "
                           f"holds {batch.ids[:5]}: Result.target_ids must keep the input order")
    n = len(res)
    summ = metrics.summary(batch.probs.to(result.logprobs.device), result.logprobs)
    df = pd.DataFrame({"target_id": res["target_id"].to_numpy(),
                       "is_bound": is_bound_method(result.method, result)}, index=range(n))
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


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def compute_cell(model, tokenizer, task: CellTask) -> CellOutput:
    """Run one cell's optimiser on `model` and return its rows and trace (never touches the disk)."""
    methods, _ = registry()
    t0 = time.perf_counter()
    result = methods[task.method](model, tokenizer, task.batch, task.config, progress=False)
    wall = time.perf_counter() - t0
    return CellOutput(task.key, result_rows(result, task.batch, task.config), result.trace_frame(), wall,
                      worker_name())

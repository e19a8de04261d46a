"""Where sweep cells run: in this process (the default), or on Ray workers (`dplib.ray_executor`).

An executor takes the cells a sweep still needs (`dplib.cells.CellTask`) and yields one
`CellOutcome` per cell as each finishes, in any order; it never writes anything. The driver
(`dplib.runner.run_sweep`) is the only writer: it stores each finished cell at once, so a killed
driver or worker loses at most the cells in flight. A cell that raises is retried up to `retries`
more times, then comes back as a failed outcome with its error, which the sweep's table reports.

A remote worker cannot be handed a model object; it gets a `ModelSpec` it can load — an
embedded name, a hub id or a local path (read by `dplib.models.load_model`), or a
"module:function" that builds the model — plus the fingerprint the driver computed, which the
worker checks after loading, so a worker that loaded other weights fails loudly instead of
filing its results under the driver's model.

`make_executor` reads the short forms a notebook parameter can hold: "local" (this process),
"ray" (a local Ray, or the cluster at $RAY_ADDRESS) and "ray:<address>".
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from .cells import CellOutput, CellTask, compute_cell

log = logging.getLogger(__name__)

DEFAULT_RETRIES = 2  # extra attempts of a failing cell before it is reported as failed


@dataclass
class CellOutcome:
    """One cell's end: `output` when it finished, else `error` (the last attempt's message).

    attempts: how many times it ran (1 = first try).
    """

    task: CellTask
    output: CellOutput | None
    error: str | None
    attempts: int

    @property
    def ok(self) -> bool:
        return self.output is not None


class Executor(Protocol):
    """Runs cells and yields their outcomes as they finish; writes nothing."""

    def describe(self) -> dict:
        """Plain values for run.json: the executor's kind and settings."""

    def run(self, model, tokenizer, tasks: Sequence[CellTask], *, retries: int = DEFAULT_RETRIES,
            model_spec: ModelSpec | None = None) -> Iterator[CellOutcome]:
        """Yield one CellOutcome per task, in completion order."""


# --------------------------------------------------------------------------------------------
# In process.
# --------------------------------------------------------------------------------------------


class InProcessExecutor:
    """The cells one after another on the driver's own model (no copies, no model loads)."""

    def describe(self) -> dict:
        return {"kind": "local"}

    def run(self, model, tokenizer, tasks, *, retries=DEFAULT_RETRIES, model_spec=None):
        for task in tasks:
            yield run_with_retries(lambda t=task: compute_cell(model, tokenizer, t), task, retries)


def run_with_retries(compute, task: CellTask, retries: int) -> CellOutcome:
    """Call `compute()` up to 1 + `retries` times; the outcome of the first success or of the last failure."""
    error = None
    for attempt in range(1, retries + 2):
        try:
            return CellOutcome(task, compute(), None, attempt)
        except Exception as exc:  # a failing cell is reported, not fatal; KeyboardInterrupt still stops
            error = f"{type(exc).__name__}: {exc}"
            log.warning("cell %d (%s) failed on attempt %d of %d: %s", task.index, task.method, attempt,
                        retries + 1, error)
    return CellOutcome(task, None, error, retries + 1)


# --------------------------------------------------------------------------------------------
# What a remote worker loads.
# --------------------------------------------------------------------------------------------


class ModelMismatchError(RuntimeError):
    """A worker loaded a model whose fingerprint is not the driver's."""


@dataclass(frozen=True)
class ModelSpec:
    """How a worker loads the driver's model, and the fingerprint it must then have.

    source: an embedded name ("smollm2-135m"), a hub id ("org/name"), a local model directory or
        .gguf (read by `dplib.models.load_model`), or "package.module:function" — a function
        returning (model, tokenizer), called with `kwargs` (e.g. "dplib.models:tiny_model").
    dtype: the weights' dtype ("float32", "bfloat16"); part of the fingerprint, so it is explicit.
    fingerprint: `lm.fingerprint` of the driver's model; None skips the check (not recommended).
    kwargs: keyword arguments of a "module:function" source (plain values).
    """

    source: str
    dtype: str = "float32"
    fingerprint: str | None = None
    kwargs: Mapping = field(default_factory=dict)

    @property
    def is_factory(self) -> bool:
        return ":" in self.source and not Path(self.source).exists() and "/" not in self.source.split(":")[0]

    def load(self, device: str = "cpu"):
        """(model, tokenizer) on `device`, checked against `fingerprint`.

        Raises ModelMismatchError when the loaded weights are not the driver's (another checkpoint
        under the same name, a different dtype, `lm.configure` overrides the worker lacks).
        """
        import torch

        from . import lm

        dtype = getattr(torch, self.dtype)
        if self.is_factory:
            module, _, name = self.source.partition(":")
            model, tokenizer = getattr(importlib.import_module(module), name)(**dict(self.kwargs))
            model = model.to(device=device, dtype=dtype)
        else:
            from .models import load_model

            model, tokenizer = load_model(self.source, device=device, dtype=dtype)
        if self.fingerprint is not None:
            found = lm.fingerprint(model)
            if found != self.fingerprint:
                raise ModelMismatchError(
                    f"the worker loaded {self.source!r} ({self.dtype}) with fingerprint {found}, but the "
                    f"driver's model has {self.fingerprint}: the worker would compute with other weights. "
                    "Make the same checkpoint available to the workers (same files, same package version), "
                    "or pass run_sweep(model_spec=ModelSpec(...)) naming exactly the driver's model; "
                    "models edited in memory or changed with lm.configure cannot be re-loaded by name.")
        return model, tokenizer

    @classmethod
    def of(cls, model, *, fingerprint: str | None = None) -> ModelSpec:
        """The spec of a model loaded by `dplib.load_model` or `dplib.tiny_model` (read from the
        `model.dplib_source` they attach); raises ValueError, saying what to pass, for any other."""
        from . import lm

        info = getattr(model, "dplib_source", None) or {}
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        fingerprint = fingerprint or lm.fingerprint(model)
        kind, name = info.get("kind"), info.get("name")
        if kind == "tiny" and name:
            _, arch, vocab = name.split("-")
            kwargs = {"vocab_size": int(vocab), "arch": arch, "seed": int(info.get("seed", 0))}
            return cls("dplib.models:tiny_model", dtype, fingerprint, kwargs)
        if kind in ("embedded", "hub") and name:
            return cls(name, dtype, fingerprint)
        if kind in ("local", "gguf") and name:
            return cls(str(Path(name).expanduser().resolve()), dtype, fingerprint)
        raise ValueError(
            "cannot tell how a worker would load this model (it was not loaded by dplib.load_model or "
            "built by dplib.tiny_model). Pass run_sweep(..., model_spec=dplib.executors.ModelSpec("
            "'package.module:function', kwargs={...})) naming a function that builds it, or save it "
            "(model.save_pretrained(dir), tokenizer.save_pretrained(dir)) and load it from that directory.")


# --------------------------------------------------------------------------------------------
# The short forms.
# --------------------------------------------------------------------------------------------


def make_executor(executor=None) -> Executor:
    """An executor from what `run_sweep(executor=...)` accepts.

    None or "local": in this process. "ray": Ray workers on `ray.init()`'s cluster (a local Ray
    on this machine; the cluster at $RAY_ADDRESS when set). "ray:<address>": the cluster at that
    address (e.g. "ray:auto", "ray:ray://head:10001"). An executor object is returned as it is.
    """
    if executor is None or executor == "local":
        return InProcessExecutor()
    if isinstance(executor, str):
        kind, _, address = executor.partition(":")
        if kind == "ray":
            from .ray_executor import RayExecutor

            return RayExecutor(address=address or None)
        raise ValueError(f"unknown executor {executor!r}: use 'local', 'ray' or 'ray:<address>' "
                         "(or an executor object such as dplib.ray_executor.RayExecutor(...))")
    if not callable(getattr(executor, "run", None)):
        raise TypeError(f"executor {executor!r} has no run(...) method; see dplib.executors.Executor")
    return executor

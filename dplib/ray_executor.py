"""Sweep cells on Ray workers: one actor per worker, one model load per actor, the driver writes.

`RayExecutor` starts `num_workers` actors (each reserving `num_cpus` CPUs and `num_gpus` GPUs,
so on a machine with several GPUs and `num_gpus=1` there is one worker per GPU). Each actor loads
the model once from its `ModelSpec`, checks the fingerprint, and then computes the cells it is
given, one at a time; the driver keeps every actor busy and yields each cell as it finishes.

Failures: a cell that raises is retried (on any worker) up to `retries` more times; a worker
that dies (killed, out of memory, its node lost) is replaced by a new actor and its cell counts
one attempt and goes back in the queue. After its last attempt a cell comes back failed with
the error, and the sweep's table reports it. A model that will not load on the first workers
is an error at once, not a retry.

Connecting follows `ray.init()`: no address → a local Ray on this machine (or the `ray start`
cluster running here); $RAY_ADDRESS or `address=` → that cluster, with unchanged code. A Ray
already initialised by the caller (e.g. `ray.init(num_cpus=2)`) is used as it is. Ray is an
optional dependency: `pip install 'dplib[ray]'`.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections import deque
from dataclasses import dataclass, field

from .cells import CellTask, compute_cell, worker_name
from .executors import DEFAULT_RETRIES, CellOutcome, ModelSpec

log = logging.getLogger(__name__)

INSTALL_HINT = ("the Ray executor needs Ray, which is an optional dependency of dplib: install it with "
                "pip install 'dplib[ray]' (or pip install ray; `make setup` installs it), or use "
                "executor='local'")


def require_ray():
    """The `ray` module, or ImportError saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc
    return ray


class CellWorker:
    """The body of one Ray actor: loads the model once, then computes cells on it."""

    def __init__(self, spec: ModelSpec, device: str, threads: int):
        import torch

        # one worker per reserved CPU: more threads than that oversubscribe the cores shared with
        # the other workers (each torch process would otherwise start one thread per core)
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        self.model, self.tokenizer = spec.load(device)
        self.info_ = {"worker": worker_name(), "pid": os.getpid(), "device": device, "threads": threads,
                      "load_s": time.perf_counter() - t0}

    def info(self) -> dict:
        """Where this worker runs and how long its model load took (seconds)."""
        return self.info_

    def run(self, task: CellTask):
        return compute_cell(self.model, self.tokenizer, task)


@dataclass
class RayExecutor:
    """Cells as calls on Ray actors, one model load per actor.

    address: the cluster (as `ray.init(address=...)`); None: $RAY_ADDRESS, else a local Ray.
    num_workers: actors to start; None: as many as the cluster's resources hold (GPUs / num_gpus
        when num_gpus > 0, else CPUs / num_cpus), never more than the cells to run.
    num_cpus: CPUs each worker reserves (default 1).
    num_gpus: GPUs each worker reserves; None: 1 if the cluster has GPUs, else 0. A worker with a
        GPU loads the model on "cuda", else on "cpu".
    threads: torch threads per worker; None: max(1, num_cpus).
    init_kwargs: extra `ray.init` arguments when this executor starts Ray (e.g. {"num_cpus": 2}).
    """

    address: str | None = None
    num_workers: int | None = None
    num_cpus: float = 1
    num_gpus: float | None = None
    threads: int | None = None
    init_kwargs: dict = field(default_factory=dict)
    # filled by run(): each worker's info() (pid, device, threads, load_s), and the seconds from
    # asking for the workers to all of them having loaded the model (process start and imports included)
    workers_info: list = field(default_factory=list, init=False, repr=False)
    startup_s: float = field(default=0.0, init=False, repr=False)

    def __post_init__(self):
        if self.num_workers is not None and self.num_workers < 1:
            raise ValueError(f"num_workers must be ≥ 1 or None (as many as fit), got {self.num_workers}")
        if self.num_cpus < 0 or (self.num_gpus is not None and self.num_gpus < 0):
            raise ValueError("num_cpus and num_gpus must be ≥ 0")

    def describe(self) -> dict:
        return {"kind": "ray", "address": self.address or os.environ.get("RAY_ADDRESS"),
                "num_workers": self.num_workers, "num_cpus": self.num_cpus, "num_gpus": self.num_gpus,
                "threads": self.threads}

    def connect(self):
        """Initialise Ray as `ray.init()` would (once per process); returns the `ray` module."""
        ray = require_ray()
        if not ray.is_initialized():
            ray.init(address=self.address, **self.init_kwargs)
            log.info("Ray: connected to %s", self.address or os.environ.get("RAY_ADDRESS") or "a local instance")
        return ray

    def _plan(self, ray, n_tasks: int) -> tuple[int, float]:
        """(workers, GPUs per worker) for this cluster."""
        resources = ray.cluster_resources()
        num_gpus = self.num_gpus if self.num_gpus is not None else (1 if resources.get("GPU", 0) >= 1 else 0)
        if self.num_workers is not None:
            n = self.num_workers
        elif num_gpus > 0:
            n = int(resources.get("GPU", 0) // num_gpus)
        else:
            n = int(resources.get("CPU", 1) // max(self.num_cpus, 1e-9))
        return max(1, min(n, n_tasks)), num_gpus

    def run(self, model, tokenizer, tasks, *, retries=DEFAULT_RETRIES, model_spec=None):
        tasks = list(tasks)
        if not tasks:
            return
        ray = self.connect()
        from ray.exceptions import RayActorError, RayTaskError

        spec = model_spec or ModelSpec.of(model)
        n_workers, num_gpus = self._plan(ray, len(tasks))
        actor = ray.remote(CellWorker).options(num_cpus=self.num_cpus, num_gpus=num_gpus)
        device = "cuda" if num_gpus > 0 else "cpu"
        threads = self.threads or max(1, int(self.num_cpus))

        started = []  # every actor of this run, replacements included: all are stopped at the end

        def start():
            started.append(actor.remote(spec, device, threads))
            return started[-1]

        t0 = time.perf_counter()
        workers = [start() for _ in range(n_workers)]
        try:
            # the first loads are awaited, so a model the workers cannot load is one clear error
            self.workers_info = ray.get([w.info.remote() for w in workers])
        except (RayTaskError, RayActorError) as exc:  # an actor whose constructor raised is a dead actor
            for worker in started:
                ray.kill(worker, no_restart=True)
            detail = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # Ray colours its tracebacks
            raise RuntimeError(f"the Ray workers could not load the model {spec.source!r}; nothing was "
                               f"computed. The worker's error: {detail}") from exc
        self.startup_s = time.perf_counter() - t0
        log.info("Ray: %d workers started and loaded %s in %.1f s", n_workers, spec.source, self.startup_s)

        queue, attempts, in_flight, idle = deque(tasks), {}, {}, list(workers)
        try:
            while queue or in_flight:
                while idle and queue:
                    worker, task = idle.pop(), queue.popleft()
                    in_flight[worker.run.remote(task)] = (worker, task)
                done, _ = ray.wait(list(in_flight), num_returns=1)
                for ref in done:
                    worker, task = in_flight.pop(ref)
                    attempts[task.index] = attempts.get(task.index, 0) + 1
                    try:
                        output = ray.get(ref)
                    except RayActorError as exc:  # the worker is gone: replace it
                        error = f"worker died: {type(exc).__name__}: {exc}"
                        worker = start()
                    except RayTaskError as exc:
                        error = f"{type(exc.cause).__name__ if exc.cause else 'RayTaskError'}: {exc.cause or exc}"
                    else:
                        idle.append(worker)
                        yield CellOutcome(task, output, None, attempts[task.index])
                        continue
                    idle.append(worker)
                    log.warning("cell %d (%s) failed on attempt %d of %d: %s", task.index, task.method,
                                attempts[task.index], retries + 1, error)
                    if attempts[task.index] > retries:
                        yield CellOutcome(task, None, error, attempts[task.index])
                    else:
                        queue.appendleft(task)
        finally:
            for worker in started:
                ray.kill(worker, no_restart=True)

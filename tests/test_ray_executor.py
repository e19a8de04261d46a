"""The Ray executor on a real local Ray (2 CPUs): the same table as in process, bit for bit; a worker
killed mid-sweep; a driver killed mid-sweep and re-run (connecting through RAY_ADDRESS); a model
the workers cannot load."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pandas as pd
import pytest
import torch

ray = pytest.importorskip("ray", reason="Ray is the optional extra dplib[ray]; `make setup` installs it")

from helpers import missing_as_none  # noqa: E402

from dplib import results, runner, targets  # noqa: E402
from dplib.executors import ModelSpec  # noqa: E402
from dplib.ray_executor import RayExecutor  # noqa: E402
from dplib.store import CellStore  # noqa: E402

SOFT = {"steps": 4, "prompt_length": 2}
HARD = {"steps": 2, "prompt_length": 2, "n_candidates": 8, "top_k": 8}
SLOW_SOFT = {"steps": 150, "prompt_length": 2}  # cells long enough (about a second) to kill something mid-way
VOLATILE = ["wall_s", "batch_wall_s"]  # timings differ between runs; everything else must not


@pytest.fixture(scope="module")
def local_ray():
    """A fresh local Ray with 2 CPUs for this module (address="local": never someone's cluster)."""
    # Ray's raylet gives its Python agents about 15 s to start, and its driver the node 30 s: on a
    # busy 2-core machine that can be too short, so the start gets two more tries
    attempts = 3
    for attempt in range(1, attempts + 1):
        try:
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
            break
        except Exception:  # Ray gives its node 30 s to register: too short on a loaded machine, so once more
            ray.shutdown()
            if attempt == attempts:
                raise
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def grid(tiny):
    model, _ = tiny
    width = targets.logits_width(model)
    return targets.vanilla(width, targets.entropy_grid(width, 6).tolist(), seed=0)




def _finished(store_dir) -> dict:
    return {p: p.stat().st_mtime_ns for p in store_dir.glob("*/*.parquet") if not p.name.endswith(".trace.parquet")}


def test_ray_gives_the_in_process_table_bit_for_bit(local_ray, tiny, grid, tmp_path):
    model, tok = tiny
    methods = {"soft": SOFT, "hard": HARD, "free_bound": {}}
    # torch's CPU kernels split reductions by thread, so the last bits follow the thread count:
    # the in-process run uses the workers' one thread
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = runner.run_sweep(model, tok, grid, methods, batch_size=2, store=tmp_path / "a", progress=False)
    finally:
        torch.set_num_threads(threads)
    executor = RayExecutor(num_workers=2, threads=1)
    remote = runner.run_sweep(model, tok, grid, methods, batch_size=2, store=tmp_path / "b", progress=False,
                              executor=executor)
    stats = remote.attrs["stats"]
    assert stats.computed == 9 and len(executor.workers_info) == 2
    assert {i["pid"] for i in executor.workers_info}.isdisjoint({os.getpid()})
    assert all(i["threads"] == 1 and i["device"] == "cpu" for i in executor.workers_info)
    pd.testing.assert_frame_equal(remote.drop(columns=VOLATILE), local.drop(columns=VOLATILE), check_exact=True)
    assert CellStore(tmp_path / "a").keys() == CellStore(tmp_path / "b").keys()


@pytest.mark.slow
def test_a_worker_killed_mid_sweep(local_ray, tiny, grid, tmp_path):
    """The cell in flight on the killed worker is run again on a new worker; the cells finished
    before are neither lost nor recomputed, and a re-run computes nothing."""
    model, tok = tiny
    grid = grid[[0, 1, 2, 3]]  # four cells on two workers: both are busy when the first cell is stored
    store_dir = tmp_path / "cells"
    executor = RayExecutor(num_workers=2, threads=1)
    out = {}
    run = results.start_run("ray", {"k": 1}, results_dir=tmp_path)

    def sweep():
        out["table"] = runner.run_sweep(model, tok, grid, {"soft": SLOW_SOFT}, batch_size=1, run=run,
                                        progress=False, executor=executor)

    thread = threading.Thread(target=sweep)
    thread.start()
    deadline = time.time() + 180
    while time.time() < deadline and not _finished(store_dir):
        time.sleep(0.05)
    before = _finished(store_dir)
    assert 1 <= len(before) < len(grid), "the sweep finished before a worker could be killed; raise its steps"
    os.kill(executor.workers_info[0]["pid"], signal.SIGKILL)
    thread.join(timeout=300)
    assert not thread.is_alive() and "table" in out
    stats = out["table"].attrs["stats"]
    assert (stats.computed, stats.failed) == (len(grid), 0)
    assert {p: p.stat().st_mtime_ns for p in before} == before  # not recomputed
    cells = run.load_table("sweep_cells")
    assert set(cells["status"]) == {"ok"} and cells["attempts"].max() == 2  # the in-flight cell, once more
    assert len(_finished(store_dir)) == len(grid) and (out["table"]["status"] == "ok").all()

    table = runner.run_sweep(model, tok, grid, {"soft": SLOW_SOFT}, batch_size=1, run=run, progress=False,
                             executor=executor)
    again = table.attrs["stats"]
    assert (again.computed, again.reused) == (0, len(grid))
    pd.testing.assert_frame_equal(table, out["table"])


def test_a_model_the_workers_cannot_load_is_one_clear_error(local_ray, tiny, grid):
    model, tok = tiny
    wrong = dataclasses.replace(ModelSpec.of(model), kwargs={"vocab_size": 380, "arch": "llama", "seed": 9})
    with pytest.raises(RuntimeError, match="(?s)could not load the model.*fingerprint"):
        runner.run_sweep(model, tok, grid[[0]], ["free_bound"], executor=RayExecutor(num_workers=1),
                         model_spec=wrong, progress=False)


DRIVER = textwrap.dedent("""
    import sys
    import torch
    from dplib import results, runner, targets
    from dplib.models import tiny_model

    torch.set_num_threads(1)
    model, tok = tiny_model(380, arch="llama", seed=0)
    width = targets.logits_width(model)
    grid = targets.vanilla(width, targets.entropy_grid(width, 6).tolist(), seed=0)
    run = results.start_run("driver", {"n": 6}, results_dir=sys.argv[1])
    runner.run_sweep(model, tok, grid, {"soft": {"steps": 150, "prompt_length": 2}}, batch_size=1, run=run,
                     model_name="tiny", progress=False, executor=sys.argv[2])
    run.finish("success")
""")


def _driver(results_dir, executor, env=None) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-c", DRIVER, str(results_dir), executor], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_a_driver_killed_mid_sweep_resumes(local_ray, tiny, grid, tmp_path):
    """The driver connects to the running Ray through RAY_ADDRESS (code unchanged: executor="ray"),
    is killed after its first cell, and the re-run stores only the rest; the table is the one a
    clean in-process run gives."""
    env = {"RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    killed = tmp_path / "killed"
    proc = _driver(killed, "ray", env)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not _finished(killed / "cells"):
        time.sleep(0.05)
    assert proc.poll() is None, "the driver ended before it could be killed: " + proc.stdout.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = _finished(killed / "cells")
    assert 1 <= len(before) < 6

    resumed = _driver(killed, "ray", env)
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output.decode()[-3000:]
    run = results.open_run(killed / "driver" / results.run_id_for({"n": 6}))
    meta = run.meta["sweeps"]["sweep"]
    assert meta["cells_reused"] >= len(before) and meta["cells_reused"] + meta["cells_computed"] == 6
    assert meta["executor"]["kind"] == "ray" and run.meta["attempts"] == 2
    assert {p: p.stat().st_mtime_ns for p in before} == before

    model, tok = tiny  # the driver's model and targets, built here the same way
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        clean = runner.run_sweep(model, tok, grid, {"soft": {"steps": 150, "prompt_length": 2}}, batch_size=1,
                                 model_name="tiny", progress=False)
    finally:
        torch.set_num_threads(threads)
    table = run.load_table("sweep")
    assert len(table) == 6 and not table.duplicated(["variant", "seed", "target_id"]).any()
    pd.testing.assert_frame_equal(missing_as_none(table.drop(columns=[*VOLATILE, "run_id"])),
                                  missing_as_none(clean.drop(columns=[*VOLATILE, "run_id"])), check_dtype=False)

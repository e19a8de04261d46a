"""The sweep runner on the tiny model with the real registry methods: the tidy table, per-target
seeds (sub-setting changes no result), the shared cell store, failed cells, and resume after SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pandas as pd
import pytest
from helpers import missing_as_none

from dplib import results, runner, targets
from dplib.store import CellStore

SOFT = {"steps": 6, "prompt_length": 2}
HARD = {"steps": 2, "prompt_length": 2, "n_candidates": 8, "top_k": 8}
VOLATILE = ["wall_s", "batch_wall_s"]  # timings differ between runs; everything else must not




@pytest.fixture(scope="module")
def grid(tiny):
    model, _ = tiny
    width = targets.logits_width(model)
    return targets.vanilla(width, targets.entropy_grid(width, 5).tolist(), seed=0)


def test_batches_are_deterministic():
    assert [list(b) for b in runner.batches(5, 2)] == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError):
        runner.batches(3, 0)


def test_sweep_table(tiny, grid, tmp_path):
    model, tok = tiny
    run = results.start_run("t", {"k": 1}, results_dir=tmp_path)
    df = runner.run_sweep(model, tok, grid, {"soft": SOFT, "hard": HARD, "free_bound": {}}, seeds=[0, 1],
                          batch_size=2, run=run, name="s", model_name="tiny", progress=False)
    stats = df.attrs["stats"]
    assert len(df) == 5 * 3 * 2 and stats.computed == 3 * 2 * 3 and stats.reused == 0
    assert df[["method", "seed"]].drop_duplicates().values.tolist() == [
        ["soft", 0], ["soft", 1], ["hard", 0], ["hard", 1], ["free_bound", 0], ["free_bound", 1]]
    required = ["run_id", "sweep", "model", "method", "variant", "is_bound", "seed", "target_id", "kind",
                "target_seed", "target_method", "entropy_nats", "kl_nats", "initial_kl_nats",
                "reverse_kl_nats", "js_nats", "tv", "top1_agree", "top10_recall", "steps", "wall_s"]
    assert not df[required].isna().any().any()
    assert (df["run_id"] == run.run_id).all() and (df["model"] == "tiny").all()
    assert df.groupby("method")["is_bound"].first().to_dict() == {"free_bound": True, "hard": False, "soft": False}
    assert df.loc[df.method == "hard", "prompt_text"].notna().all()  # the filter keeps faithful texts only
    prompts = df[df.method != "free_bound"]
    assert (prompts["prompt_text_exact"].astype(bool) == prompts["prompt_text"].notna()).all()
    assert df.loc[df.method == "soft", "projected_kl_nats"].notna().all()
    assert df.loc[df.method == "hard", "projected_kl_nats"].isna().all()
    assert (df["kl_nats"] >= -1e-5).all()
    # the bound is below the prompts, target by target (free-h is a lower bound)
    kl = df[df.seed == 0].pivot(index="target_id", columns="method", values="kl_nats")
    assert (kl["free_bound"] <= kl["soft"] + 1e-4).all() and (kl["free_bound"] <= kl["hard"] + 1e-4).all()
    # entropy is the target's realised entropy, and the metadata came along
    assert df.loc[df.method == "soft"].groupby("seed")["entropy_nats"].apply(list).iloc[0] == \
        pytest.approx(grid.entropy.tolist(), abs=1e-5)
    assert (df["status"] == "ok").all() and df["error"].isna().all()
    # written: table, trace, the cells in the shared store (results/cells), the run's cell list, run.json
    pd.testing.assert_frame_equal(missing_as_none(run.load_table("s")), missing_as_none(df), check_dtype=False)
    trace = run.load_table("s_trace")
    assert {"run_id", "sweep", "method", "variant", "seed", "target_id", "step", "kl_nats"} <= set(trace)
    store = CellStore(tmp_path / "cells")
    cells = run.load_table("s_cells")
    assert len(cells) == 18 and sorted(cells["key"]) == store.keys()
    assert set(cells["status"]) == {"ok"} and set(cells["origin"]) == {"computed"}
    assert len(list(store.root.glob("*/*.trace.parquet"))) == 18
    sweep_meta = run.meta["sweeps"]["s"]
    assert sweep_meta["status"] == "success" and sweep_meta["cells_computed"] == 18
    assert sweep_meta["store"] == str(store.root.resolve()) and sweep_meta["executor"] == {"kind": "local"}
    assert sweep_meta["methods"]["soft"]["config"]["steps"] == SOFT["steps"]


def test_subsetting_or_rebatching_changes_no_result(tiny, grid):
    model, tok = tiny
    methods = {"soft": SOFT, "hard": HARD}
    full = runner.run_sweep(model, tok, grid, methods, batch_size=5, progress=False)
    part = runner.run_sweep(model, tok, grid[[3, 1]], methods, batch_size=1, progress=False)
    cols = ["method", "target_id", "kl_nats", "prompt_text", "steps"]
    merged = part[cols].merge(full[cols], on=["method", "target_id"], suffixes=("_part", "_full"))
    assert len(merged) == 4
    assert merged["kl_nats_part"].to_numpy() == pytest.approx(merged["kl_nats_full"].to_numpy(), abs=1e-4)
    assert merged["prompt_text_part"].fillna("<none>").tolist() == merged["prompt_text_full"].fillna("<none>").tolist()


def test_resume_reuses_finished_cells(tiny, grid, tmp_path):
    model, tok = tiny
    run = results.start_run("t", {"k": 2}, results_dir=tmp_path)
    first = runner.run_sweep(model, tok, grid, {"soft": SOFT}, batch_size=2, run=run, progress=False)
    cells = sorted((tmp_path / "cells").glob("*/*.parquet"))
    mtimes = {p: p.stat().st_mtime_ns for p in cells}
    again = runner.run_sweep(model, tok, grid, {"soft": SOFT}, batch_size=2, run=run, progress=False)
    stats = again.attrs["stats"]
    assert stats.computed == 0 and stats.reused == 3
    assert {p: p.stat().st_mtime_ns for p in cells} == mtimes
    pd.testing.assert_frame_equal(missing_as_none(first), missing_as_none(again), check_dtype=False)
    # a changed config is a different cell: computed, not reused
    stats = runner.run_sweep(model, tok, grid[[0]], {"soft": {**SOFT, "steps": 5}}, batch_size=2, run=run,
                             progress=False).attrs["stats"]
    assert stats.computed == 1 and stats.reused == 0


def test_run_methods_and_results_table(tiny, grid):
    model, tok = tiny
    found = runner.run_methods(model, tok, grid[[2]], {"soft": SOFT, "free_bound": {}}, seed=0, progress=False)
    assert list(found) == ["soft", "free_bound"]
    table = runner.results_table(found, grid[[2]], model_name="tiny")
    assert table["method"].tolist() == ["soft", "free_bound"] and table["kl_nats"].notna().all()
    sweep = runner.run_sweep(model, tok, grid[[2]], {"soft": SOFT}, progress=False)
    assert table["kl_nats"].iloc[0] == pytest.approx(sweep["kl_nats"].iloc[0], abs=1e-5)  # same cell seed


def test_width_mismatch_is_refused(tiny, tiny_b):
    model, tok = tiny_b
    width = targets.logits_width(tiny[0])
    with pytest.raises(targets.TargetError, match="width"):
        runner.run_sweep(model, tok, targets.vanilla(width, [1.0]), {"soft": SOFT}, progress=False)


SWEEP_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    from dplib import results, runner, targets
    from dplib.models import tiny_model

    torch.set_num_threads(1)
    model, tok = tiny_model(380, arch="llama", seed=0)
    width = targets.logits_width(model)
    grid = targets.vanilla(width, targets.entropy_grid(width, 6).tolist(), seed=0)
    run = results.start_run("resume", {"n": 6}, results_dir=sys.argv[1])
    runner.run_sweep(model, tok, grid, {"soft": {"steps": int(sys.argv[2]), "prompt_length": 2}},
                     batch_size=2, run=run, name="sweep", model_name="tiny", progress=False)
    run.finish("success")
""")


def _sweep(results_dir, steps) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-c", SWEEP_SCRIPT, str(results_dir), str(steps)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _finished_cells(store_dir):
    return [p for p in store_dir.glob("*/*.parquet") if not p.name.endswith(".trace.parquet")]


@pytest.mark.slow
def test_killed_sweep_resumes_to_the_same_table(tmp_path):
    steps = 60
    killed_dir, clean_dir = tmp_path / "killed", tmp_path / "clean"
    proc = _sweep(killed_dir, steps)
    store_dir = killed_dir / "cells"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if _finished_cells(store_dir):
            break  # the first cell is finished: kill the run while the second is in flight
        time.sleep(0.05)
    assert proc.poll() is None, "the sweep finished before it could be killed; raise its steps"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = _finished_cells(store_dir)
    assert 1 <= len(done) < 3
    before = {p: p.stat().st_mtime_ns for p in done}
    run = results.open_run(killed_dir / "resume" / results.run_id_for({"n": 6}))
    assert run.meta["status"] == "running"  # the kill left it unfinished
    assert set(run.load_table("sweep_cells")["status"]) == {"pending"}  # as planned before any cell finished

    resumed = _sweep(killed_dir, steps)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out.decode()
    meta = run.meta
    assert meta["status"] == "success" and meta["attempts"] == 2
    assert meta["sweeps"]["sweep"]["cells_reused"] == len(done)
    assert meta["sweeps"]["sweep"]["cells_computed"] == 3 - len(done)
    assert {p: p.stat().st_mtime_ns for p in before} == before  # not redone
    assert len(_finished_cells(store_dir)) == 3

    clean = _sweep(clean_dir, steps)
    out, _ = clean.communicate(timeout=300)
    assert clean.returncode == 0, out.decode()
    a = run.load_table("sweep").drop(columns=VOLATILE)
    b = results.open_run(clean_dir / "resume" / run.run_id).load_table("sweep").drop(columns=VOLATILE)
    pd.testing.assert_frame_equal(missing_as_none(a), missing_as_none(b))


def test_models_that_share_a_name_never_share_cells(tiny, grid, tmp_path):
    """Cells are keyed by the model's weights: another model, a bf16 copy or edited weights under the
    same name and in the same run directory recompute everything (the old name key reused them)."""
    import copy

    import torch

    model, tok = tiny
    run = results.start_run("t", {"k": 3}, results_dir=tmp_path)
    first = runner.run_sweep(model, tok, grid, {"free_bound": {}}, run=run, name="s", model_name="same",
                             progress=False)
    edited = copy.deepcopy(model)
    with torch.no_grad():
        weight = edited.get_output_embeddings().weight
        weight.add_(0.1 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
    second = runner.run_sweep(edited, tok, grid, {"free_bound": {}}, run=run, name="s", model_name="same",
                              progress=False)
    stats = second.attrs["stats"]
    assert stats.reused == 0 and stats.computed == len(runner.batches(len(grid), runner.DEFAULT_BATCH_SIZE))
    assert not (first["kl_nats"].to_numpy() == pytest.approx(second["kl_nats"].to_numpy(), abs=1e-6))
    again = runner.run_sweep(model, tok, grid, {"free_bound": {}}, run=run, name="s", model_name="same",
                             progress=False).attrs["stats"]
    assert again.computed == 0  # the first model's cells are still found under its own fingerprint

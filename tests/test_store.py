"""The cell store and what goes through it, in process: atomic cells, cells shared by runs and
notebooks (labels and metadata from the reader), failed cells retried, reported, and not stored."""

from __future__ import annotations

import copy

import pandas as pd
import pytest

from dplib import optim, results, runner, targets
from dplib.results import write_frame
from dplib.store import CellStore, default_store, store_for

SOFT = {"steps": 4, "prompt_length": 2}
HARD = {"steps": 2, "prompt_length": 2, "n_candidates": 8, "top_k": 8}
VOLATILE = ["run_id", "wall_s", "batch_wall_s"]


@pytest.fixture(scope="module")
def grid(tiny):
    model, _ = tiny
    width = targets.logits_width(model)
    return targets.vanilla(width, targets.entropy_grid(width, 6).tolist(), seed=0)


# ---- the store ---------------------------------------------------------------------------------


def test_a_cell_is_read_only_once_complete(tmp_path):
    store = CellStore(tmp_path / "cells")
    key = "ab" + "0" * 30
    rows = pd.DataFrame({"target_id": ["t0", "t1"], "kl_nats": [0.5, 0.25]})
    trace = pd.DataFrame({"target_id": ["t0", "t1"], "step": [0, 0], "kl_nats": [1.0, 2.0]})
    assert store.get(key) is None and store.keys() == []
    # a writer killed after the trace and during the rows' atomic write leaves no readable cell
    write_frame(trace, store.trace_path(key))
    (store.root / key[:2] / f".{key}.parquet.x1.tmp").write_bytes(b"PAR1 half a file")
    assert not store.has(key) and store.get(key) is None and store.keys() == []
    store.put(key, rows, trace)
    got_rows, got_trace = store.get(key)
    pd.testing.assert_frame_equal(got_rows, rows)
    pd.testing.assert_frame_equal(got_trace, trace)
    assert store.keys() == [key] and store.rows_path(key).parent.name == "ab"


def test_where_the_store_is(tmp_path):
    run = results.start_run("nb", {"a": 1}, results_dir=tmp_path)
    assert store_for(run).root == tmp_path / "cells" == default_store(tmp_path).root
    assert store_for(run, tmp_path / "elsewhere").root == tmp_path / "elsewhere"
    assert store_for(None) is None


# ---- sharing cells -------------------------------------------------------------------------------


def test_runs_and_notebooks_share_cells(tiny, grid, tmp_path):
    """A second run of a notebook that changed only an analysis parameter, and another notebook
    whose sweep overlaps, compute none of the cells already in the store; what they read carries
    their own labels and target metadata."""
    model, tok = tiny
    first_run = results.start_run("01_nb", {"n_bins": 3}, results_dir=tmp_path)
    first = runner.run_sweep(model, tok, grid, {"soft": SOFT, "free_bound": {}}, batch_size=2, run=first_run,
                             progress=False)
    stats = first.attrs["stats"]
    assert (stats.computed, stats.reused) == (6, 0)

    rerun = results.start_run("01_nb", {"n_bins": 4}, results_dir=tmp_path)
    assert rerun.path != first_run.path
    again = runner.run_sweep(model, tok, grid, {"soft": SOFT, "free_bound": {}}, batch_size=2, run=rerun,
                             progress=False)
    stats = again.attrs["stats"]
    assert (stats.computed, stats.reused) == (0, 6)
    pd.testing.assert_frame_equal(again.drop(columns=["run_id"]), first.drop(columns=["run_id"]))
    assert (again["run_id"] == rerun.run_id).all()
    assert set(rerun.load_table("sweep_cells")["origin"]) == {"reused"}

    other_run = results.start_run("02_nb", {}, results_dir=tmp_path)
    relabelled = targets.Targets(grid.probs, grid.meta.assign(source="mine"))
    other = runner.run_sweep(model, tok, relabelled, {"soft_main": ("soft", SOFT), "hard": HARD}, batch_size=2,
                             run=other_run, name="other", model_name="tiny", progress=False)
    stats = other.attrs["stats"]
    assert (stats.computed, stats.reused) == (3, 3)  # the soft cells were there, the hard ones were not
    assert set(other["variant"]) == {"soft_main", "hard"} and (other["sweep"] == "other").all()
    assert (other["model"] == "tiny").all() and (other["source"] == "mine").all()
    soft = other[other.variant == "soft_main"]
    assert soft["kl_nats"].tolist() == first.loc[first.method == "soft", "kl_nats"].tolist()


def test_equal_cells_in_one_sweep_are_computed_once(tiny, grid, tmp_path):
    model, tok = tiny
    df = runner.run_sweep(model, tok, grid[[0, 1]], {"a": ("soft", SOFT), "b": ("soft", SOFT)},
                          store=tmp_path, progress=False)
    stats = df.attrs["stats"]
    assert stats.computed == 1 and len(CellStore(tmp_path).keys()) == 1
    assert df.groupby("variant")["kl_nats"].apply(list).to_dict() == {
        "a": df.loc[df.variant == "a", "kl_nats"].tolist(), "b": df.loc[df.variant == "a", "kl_nats"].tolist()}


def test_models_that_share_a_name_never_share_cells_across_runs(tiny, grid, tmp_path):
    import torch

    model, tok = tiny
    edited = copy.deepcopy(model)
    with torch.no_grad():
        edited.get_output_embeddings().weight.mul_(1.5)
    runner.run_sweep(model, tok, grid, {"free_bound": {}}, run=results.start_run("a", {}, results_dir=tmp_path),
                     model_name="same", progress=False)
    stats = runner.run_sweep(edited, tok, grid, {"free_bound": {}}, run=results.start_run("b", {}, results_dir=tmp_path),
                             model_name="same", progress=False).attrs["stats"]
    assert stats.reused == 0 and stats.computed == 1 and len(CellStore(tmp_path / "cells").keys()) == 2


# ---- failed cells --------------------------------------------------------------------------------


def test_a_failing_cell_is_retried_then_reported_and_not_stored(tiny, grid, tmp_path, monkeypatch):
    model, tok = tiny
    calls = []

    def flaky(model, tokenizer, batch, config=None, *, progress=True):
        calls.append(batch.ids)
        if len(calls) <= 2:
            raise RuntimeError("transient trouble")
        return optim.free_bound(model, tokenizer, batch, progress=progress)

    monkeypatch.setitem(optim.METHODS, "flaky", flaky)
    run = results.start_run("nb", {"k": 1}, results_dir=tmp_path)
    ok = runner.run_sweep(model, tok, grid[[0]], ["flaky"], run=run, name="flaky", retries=2, progress=False)
    assert len(calls) == 3 and (ok["status"] == "ok").all()  # two failures, then the third attempt
    assert run.load_table("flaky_cells")["attempts"].tolist() == [3]

    # a cell that fails every time: 1 + retries attempts, then status "failed"; the other cells are kept
    bad = {"soft": {"steps": 2, "prompt_length": 300}, "free_bound": {}}  # 301 positions > the tiny model's 256
    with pytest.raises(runner.SweepError, match="failed after 2 attempts") as err:
        runner.run_sweep(model, tok, grid, bad, batch_size=3, run=run, retries=1, progress=False)
    table = err.value.table
    stats = table.attrs["stats"]
    assert (stats.computed, stats.failed) == (2, 2)
    failed = table[table.method == "soft"]
    assert (failed["status"] == "failed").all() and failed["kl_nats"].isna().all()
    assert failed["error"].str.contains("accepts at most 256").all() and len(failed) == len(grid)
    assert (table.loc[table.method == "free_bound", "status"] == "ok").all()
    saved = run.load_table("sweep")
    assert saved["status"].tolist() == table["status"].tolist()
    cells = run.load_table("sweep_cells")
    assert cells.loc[cells.method == "soft", ["status", "attempts"]].values.tolist() == [["failed", 2]] * 2
    assert run.meta["sweeps"]["sweep"]["status"] == "failed" and run.meta["sweeps"]["sweep"]["cells_failed"] == 2
    assert len(CellStore(tmp_path / "cells").keys()) == 1 + 2  # flaky's cell and the two bound cells

    reported = runner.run_sweep(model, tok, grid, bad, batch_size=3, run=run, retries=0, progress=False,
                                allow_failed=True)
    stats = reported.attrs["stats"]
    assert (stats.computed, stats.reused, stats.failed) == (0, 2, 2)  # failures are retried on a re-run
    assert reported["status"].tolist() == table["status"].tolist()

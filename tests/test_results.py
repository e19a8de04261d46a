"""Run directories: run ids, run.json content, atomic tables and figures, load_runs."""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from dplib import results  # noqa: E402


def test_run_id_is_a_function_of_the_identity_parameters():
    a = results.run_id_for({"model": "m", "seed": 0, "results_dir": "x", "progress": True})
    b = results.run_id_for({"seed": 0, "model": "m", "results_dir": "elsewhere", "progress": False})
    c = results.run_id_for({"model": "m", "seed": 1})
    assert a == b  # key order and non-identity parameters do not matter
    assert a != c
    assert a.startswith("run-") and len(a) == 14


def test_stable_hash_handles_dataclasses_tuples_and_numpy():
    import dataclasses

    import numpy as np

    @dataclasses.dataclass(frozen=True)
    class Cfg:
        betas: tuple = (0.9, 0.999)
        n: int = 3

    assert results.stable_hash(Cfg()) == results.stable_hash({"betas": [0.9, 0.999], "n": 3})
    assert results.stable_hash({"x": np.int64(3)}) == results.stable_hash({"x": 3})


def test_start_run_writes_run_json(tmp_path):
    params = {"model_name": "tiny", "seed": 3, "results_dir": str(tmp_path)}
    run = results.start_run("99_test", params, results_dir=tmp_path, device="cpu",
                            configs={"soft": {"steps": 5}})
    assert run.path == tmp_path / "99_test" / results.run_id_for(params)
    meta = json.loads((run.path / "run.json").read_text())
    assert meta["status"] == "running"
    assert meta["notebook"] == "99_test" and meta["run_id"] == run.run_id
    assert meta["parameters"] == params and meta["seeds"] == 3
    assert meta["configs"] == {"soft": {"steps": 5}}
    assert meta["versions"]["python"] and meta["versions"]["pandas"] == pd.__version__
    assert set(meta["git"]) == {"commit", "dirty"}
    assert meta["device"]["requested"] == "cpu" and meta["device"]["cpu_count"] >= 1
    assert meta["start"] and meta["end"] is None and meta["attempts"] == 1
    done = run.finish("success", note="ok")
    assert done["status"] == "success" and done["end"] and done["duration_s"] >= 0 and done["note"] == "ok"


def test_reopening_a_run_keeps_its_start_and_counts_attempts(tmp_path):
    params = {"a": 1}
    first = results.start_run("nb", params, results_dir=tmp_path)
    first.record("sweeps", "main", {"n": 2})
    start = first.meta["start"]
    again = results.start_run("nb", params, results_dir=tmp_path)
    assert again.path == first.path
    meta = again.meta
    assert meta["start"] == start and meta["attempts"] == 2 and meta["status"] == "running"
    assert meta["sweeps"] == {"main": {"n": 2}}  # a resumed run keeps what its sweeps recorded


def test_explicit_run_id_and_bad_status(tmp_path):
    run = results.start_run("nb", {"a": 1}, results_dir=tmp_path, run_id="mine")
    assert run.run_id == "mine"
    with pytest.raises(ValueError, match="status"):
        run.finish("done")


def test_tables_figures_and_atomicity(tmp_path):
    run = results.start_run("nb", {"a": 1}, results_dir=tmp_path)
    df = pd.DataFrame({"x": [1, 2], "kl_nats": [0.5, 0.25], "text": ["a,b", 'q"uo\rte\x85']})
    csv = run.save_table(df, "summary", headline=True)
    pq = run.save_table(df, "trace", "parquet")
    assert csv.name == "summary.csv" and pq.name == "trace.parquet"
    pd.testing.assert_frame_equal(run.load_table("summary"), df)
    pd.testing.assert_frame_equal(run.load_table("trace"), df)
    assert run.tables() == ["summary", "trace"]
    assert run.meta["headline_table"] == "tables/summary.csv"
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    png = run.save_figure(fig, "line")
    plt.close(fig)
    assert png.exists() and png.stat().st_size > 0 and run.figures() == [png]
    leftovers = [p.name for p in run.path.rglob(".*tmp*")]
    assert leftovers == []  # no temporary files left behind
    with pytest.raises(FileNotFoundError, match="no table"):
        run.load_table("missing")
    with pytest.raises(ValueError, match="csv"):
        run.save_table(df, "bad", "xlsx")


def test_load_runs_concatenates_with_metadata(tmp_path):
    for seed in (0, 1):
        run = results.start_run("01_sweep", {"seed": seed, "sizes": [1, 2]}, results_dir=tmp_path)
        run.save_table(pd.DataFrame({"target_id": ["a", "b"], "kl_nats": [seed, seed + 0.5]}), "results")
        run.finish("success" if seed == 0 else "failed")
    other = results.start_run("02_other", {"seed": 0}, results_dir=tmp_path)
    other.save_table(pd.DataFrame({"target_id": ["c"], "kl_nats": [9.0]}), "results")

    df = results.load_runs("01_sweep/*", "results", results_dir=tmp_path)
    assert len(df) == 4
    assert set(df["notebook"]) == {"01_sweep"} and df["run_id"].nunique() == 2
    assert sorted(df["param_seed"].unique()) == [0, 1]
    assert set(df["param_sizes"]) == {"[1, 2]"}
    assert set(df["run_status"]) == {"success", "failed"}
    assert "git_commit" in df
    assert len(results.load_runs("*/*", "results", results_dir=tmp_path)) == 5
    assert len(results.load_runs("*/*", "results", results_dir=tmp_path, status="success")) == 2
    assert results.load_runs("*/*", "nothing", results_dir=tmp_path).empty
    runs = results.runs_frame(results_dir=tmp_path)
    assert len(runs) == 3 and set(runs["status"]) == {"success", "failed", "running"}


def test_open_run_requires_run_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="run.json"):
        results.open_run(tmp_path)


RECORDER = """
import sys, time
from pathlib import Path
from dplib import results
run, who, n = results.open_run(sys.argv[1]), sys.argv[2], int(sys.argv[3])
while not (run.path / "go").exists():  # start together, so the writers really overlap
    time.sleep(0.01)
for i in range(n):
    run.record("entries", f"{who}-{i}", i)
    if i % 10 == 0:
        run.update(**{f"last_{who}": i})
"""


def test_run_json_records_from_several_processes_lose_nothing(tmp_path):
    """Three processes record 150 entries each into one run.json at once: all 450 are there (without
    the lock, read-modify-write races lose about half of them)."""
    import subprocess
    import sys

    run = results.start_run("nb", {"a": 1}, results_dir=tmp_path)
    procs = [subprocess.Popen([sys.executable, "-c", RECORDER, str(run.path), f"p{k}", "150"])
             for k in range(3)]
    (run.path / "go").touch()
    assert [p.wait(timeout=300) for p in procs] == [0] * 3
    meta = run.meta
    assert len(meta["entries"]) == 450
    assert meta["entries"] == {f"p{k}-{i}": i for k in range(3) for i in range(150)}
    assert all(meta[f"last_p{k}"] == 140 for k in range(3))
    assert meta["status"] == "running" and meta["notebook"] == "nb"  # nothing else was lost either


def test_locked_is_exclusive_across_processes(tmp_path):
    """While this process holds the lock, another process cannot take it."""
    import subprocess
    import sys

    path = tmp_path / "x.json"
    probe = ("import fcntl, sys; fh = open(sys.argv[1], 'a+b')\n"
             "try:\n    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept BlockingIOError:\n    sys.exit(3)\n")
    lock_file = tmp_path / ".x.json.lock"
    with results.locked(path):
        assert subprocess.run([sys.executable, "-c", probe, str(lock_file)]).returncode == 3
    assert subprocess.run([sys.executable, "-c", probe, str(lock_file)]).returncode == 0


def test_save_figure_records_alt_text_and_the_main_figure(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = results.start_run("nb", {"a": 1}, results_dir=tmp_path)
    assert run.main_figure() is None
    fig, ax = plt.subplots()
    ax.set_title("KL vs\nentropy")
    first = run.save_figure(fig, "a_first")
    main = run.save_figure(fig, "b_main", main=True, alt="the main one")
    fig.suptitle("a suptitle")
    third = run.save_figure(fig, "c_third")
    plt.close(fig)
    assert run.main_figure() == main and run.figures() == [first, main, third]
    assert [run.figure_alt(p) for p in (first, main, third)] == ["KL vs entropy", "the main one", "a suptitle"]
    assert run.meta["main_figure"] == "figures/b_main.png"

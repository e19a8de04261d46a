"""Executors and model specs without Ray: the short forms `run_sweep(executor=...)` accepts, the
in-process executor, what a remote worker loads (and its fingerprint check), the install message
when Ray is missing, and the notebooks' `executor` parameter."""

from __future__ import annotations

import copy
import dataclasses
import sys

import pytest

from dplib import executors, lm, notebooks, results, runner, targets
from dplib.executors import InProcessExecutor, ModelMismatchError, ModelSpec, make_executor
from dplib.models import load_model


@pytest.fixture(scope="module")
def grid(tiny):
    model, _ = tiny
    width = targets.logits_width(model)
    return targets.vanilla(width, [1.0, 3.0], seed=0)


def test_model_spec_of_a_tiny_model_loads_the_same_weights(tiny):
    model, _ = tiny
    spec = ModelSpec.of(model)
    assert spec.source == "dplib.models:tiny_model" and spec.dtype == "float32"
    assert spec.kwargs == {"vocab_size": 380, "arch": "llama", "seed": 0}
    assert spec.fingerprint == lm.fingerprint(model)
    loaded, tok = spec.load("cpu")
    assert lm.fingerprint(loaded) == spec.fingerprint and len(tok) == 380
    with pytest.raises(ModelMismatchError, match="fingerprint"):
        dataclasses.replace(spec, kwargs={**spec.kwargs, "seed": 1}).load("cpu")
    bare = copy.deepcopy(model)
    del bare.dplib_source
    with pytest.raises(ValueError, match="model_spec=dplib.executors.ModelSpec"):
        ModelSpec.of(bare)


def test_model_spec_of_a_local_directory(tiny, tmp_path):
    """A local path becomes absolute (workers need not share the driver's working directory); the
    worker's copy is checked against the driver's fingerprint."""
    model, tok = tiny
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded, _ = load_model(tmp_path / "m", device="cpu", dtype="float32")
    spec = ModelSpec.of(loaded)
    assert spec.source == str((tmp_path / "m").resolve()) and not spec.is_factory
    again, _ = spec.load("cpu")
    assert lm.fingerprint(again) == spec.fingerprint
    with pytest.raises(ModelMismatchError, match="same checkpoint"):
        dataclasses.replace(spec, dtype="bfloat16").load("cpu")


def test_make_executor_forms(monkeypatch):
    assert isinstance(make_executor(None), InProcessExecutor) and isinstance(make_executor("local"), InProcessExecutor)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray_executor = make_executor("ray")
    assert ray_executor.describe()["kind"] == "ray" and ray_executor.address is None
    assert make_executor("ray:ray://head:10001").address == "ray://head:10001"
    mine = InProcessExecutor()
    assert make_executor(mine) is mine
    with pytest.raises(ValueError, match="'local', 'ray'"):
        make_executor("spark")
    with pytest.raises(TypeError, match="run"):
        make_executor(object())


def test_without_ray_the_ray_executor_says_how_to_install_it(tiny, grid, monkeypatch):
    model, tok = tiny
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(ImportError, match=r"pip install 'dplib\[ray\]'"):
        runner.run_sweep(model, tok, grid[[0]], ["free_bound"], executor="ray", progress=False)


def test_in_process_executor_yields_every_cell(tiny, grid):
    model, tok = tiny
    tasks = [executors.CellTask(i, f"k{i}", "free_bound", None, grid[[i]]) for i in range(2)]
    outcomes = list(InProcessExecutor().run(model, tok, tasks))
    assert [o.task.index for o in outcomes] == [0, 1] and all(o.ok and o.attempts == 1 for o in outcomes)
    assert outcomes[0].output.rows["target_id"].tolist() == grid[[0]].ids


@pytest.mark.parametrize("name", ["01_entropy_sweep", "02_outlier_study", "03_lm_targets", "04_soft_vs_hard",
                                  "05_bottleneck"])
def test_notebooks_take_an_executor_that_is_not_part_of_the_run_id(name, tmp_path):
    path = notebooks.notebooks_dir() / f"{name}.ipynb"
    assert notebooks.default_parameters(path)["executor"] == "local"  # make reproduce: in process
    source = "".join("".join(c["source"]) for c in notebooks.params._read(path)["cells"] if c["cell_type"] == "code")
    assert source.count("runner.run_sweep(") == source.count("executor=executor")
    local, _ = notebooks.run_parameters(path, results_dir=tmp_path)
    remote, inject = notebooks.run_parameters(path, results_dir=tmp_path, executor="ray")
    assert inject["executor"] == "ray" and remote["run_id"] == local["run_id"]
    assert results.run_id_for({**local, "executor": "ray"}) == local["run_id"]


def test_ray_is_an_optional_extra_that_make_installs():
    import tomllib

    root = notebooks.repo_root()
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert any(d.startswith("ray") for d in project["optional-dependencies"]["ray"])
    assert not any(d.startswith("ray") for d in project["dependencies"])  # dplib imports without it
    assert "-e '.[dev,ray]'" in (root / "Makefile").read_text()  # so `make test` runs the Ray tests

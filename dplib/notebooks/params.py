"""The notebooks and their parameters: where they are, the `parameters` cell read as literals, the
parameters a headless run passes (smoke ones from `metadata["dplib"]["smoke"]`), and `start_run`,
which a notebook calls with its own namespace.
"""

from __future__ import annotations

import ast
import json
import os
from collections.abc import Mapping
from pathlib import Path

from ..results import Run, run_id_for

# The study's notebooks (SPEC §Experiments); reproduce runs what exists and names what is missing.
EXPECTED = ("00_quickstart", "01_entropy_sweep", "02_outlier_study", "03_lm_targets",
            "04_soft_vs_hard", "05_bottleneck", "06_distribution_proposers")
KERNEL_NAME = "python3"  # jupyter_client starts "python" kernelspecs with sys.executable


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def notebooks_dir() -> Path:
    return repo_root() / "notebooks"


def list_notebooks(folder: str | os.PathLike | None = None) -> list[Path]:
    """The notebooks of `folder` (default: the repository's notebooks/), sorted by name."""
    folder = Path(folder) if folder is not None else notebooks_dir()
    return sorted(p for p in folder.glob("*.ipynb") if not p.name.startswith("."))


def _read(path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def parameters_cell(nb: Mapping) -> dict | None:
    """The (first) code cell tagged `parameters`, or None."""
    for cell in nb["cells"]:
        if cell["cell_type"] == "code" and "parameters" in cell.get("metadata", {}).get("tags", []):
            return cell
    return None


def _source(cell) -> str:
    src = cell["source"]
    return "".join(src) if isinstance(src, list) else src


def default_parameters(path: str | os.PathLike) -> dict:
    """{name: value} of the notebook's `parameters` cell (literals, evaluated safely)."""
    cell = parameters_cell(_read(path))
    if cell is None:
        raise ValueError(f"{path} has no cell tagged 'parameters'")
    out = {}
    for node in ast.parse(_source(cell)).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            out[node.targets[0].id] = ast.literal_eval(node.value)
    return out


def notebook_path(notebook: str | os.PathLike) -> Path:
    """A notebook's file: a path as given, or a name ("01_entropy_sweep") in the repository's notebooks/."""
    path = Path(notebook)
    if path.suffix != ".ipynb":
        path = notebooks_dir() / f"{notebook}.ipynb"
    if not path.exists():
        raise FileNotFoundError(f"no notebook {path} (have {[p.stem for p in list_notebooks()]})")
    return path


def cell_parameters(notebook: str | os.PathLike, namespace: Mapping) -> dict:
    """The run's parameters: every name the notebook's `parameters` cell assigns, with its value now.

    The names are read from the cell itself (the committed notebook's file), the values from
    `namespace` (the kernel's `globals()`, after papermill's injected overrides), so the dictionary
    that defines a run's identity is never retyped: a parameter added to the cell is in it.
    Raises KeyError naming any parameter the namespace lacks (the parameters cell has not run).
    """
    names = list(default_parameters(notebook_path(notebook)))
    missing = [n for n in names if n not in namespace]
    if missing:
        raise KeyError(f"parameters {missing} of {Path(notebook).stem}'s parameters cell are not defined here; "
                       "run the parameters cell first")
    return {n: namespace[n] for n in names}


def start_run(notebook: str, namespace: Mapping) -> Run:
    """Open the notebook's run from its parameters cell: `results.start_run(notebook, cell_parameters(...))`
    with `results_dir`, `run_id` and `device` taken from the same parameters (those it declares).

    In a notebook: `run = notebooks.start_run("01_entropy_sweep", globals())`.
    """
    from ..results import RESULTS_DIR
    from ..results import start_run as _start_run

    params = cell_parameters(notebook, namespace)
    return _start_run(Path(notebook).stem, params, results_dir=params.get("results_dir", RESULTS_DIR),
                      run_id=params.get("run_id"), device=params.get("device"))


def smoke_parameters(path: str | os.PathLike) -> dict:
    """The notebook's smoke parameters (`metadata["dplib"]["smoke"]`), {} if none."""
    return dict(_read(path).get("metadata", {}).get("dplib", {}).get("smoke", {}))


def run_parameters(path: str | os.PathLike, *, results_dir: str | os.PathLike, smoke: bool = False,
                   device: str | None = None, executor: str | None = None,
                   overrides: Mapping | None = None) -> tuple[dict, dict]:
    """(effective parameters, parameters to inject) for one execution of a notebook."""
    defaults = default_parameters(path)
    inject = dict(smoke_parameters(path)) if smoke else {}
    inject.update(overrides or {})
    runtime = {"results_dir": str(Path(results_dir).resolve()), "progress": False, "interactive": False}
    if device is not None:
        runtime["device"] = device
    if executor is not None:  # where the sweeps' cells run; not part of the run id (results.NOT_IDENTITY)
        runtime["executor"] = executor
    inject.update({k: v for k, v in runtime.items() if k in defaults})
    unknown = sorted(set(inject) - set(defaults))
    if unknown:
        raise ValueError(f"{Path(path).name}: parameters {unknown} are not declared in its parameters cell")
    effective = {**defaults, **inject}
    if "run_id" in defaults and not inject.get("run_id"):
        inject["run_id"] = effective["run_id"] = run_id_for(effective)
    return effective, inject

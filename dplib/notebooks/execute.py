"""Execute notebooks headlessly: papermill into the run directory, the HTML render, `reproduce`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..files import atomic_write_text
from ..results import Run, run_id_for
from .checks import runtime_check
from .index import write_index
from .params import (
    EXPECTED,
    KERNEL_NAME,
    _read,
    _source,
    list_notebooks,
    parameters_cell,
    repo_root,
    run_parameters,
)

log = logging.getLogger(__name__)


@dataclass
class NotebookRun:
    """The outcome of executing one notebook."""

    name: str
    status: str  # "success" or "failed"
    run_dir: Path | None
    executed: Path | None
    html: Path | None
    wall_s: float
    error: str | None = None
    cell_index: int | None = None  # 0-based index of the failing cell in the notebook file
    exec_count: int | None = None

    def describe(self) -> str:
        if self.status == "success":
            return f"{self.name}: success in {self.wall_s:.0f} s -> {self.run_dir}"
        where = ""
        if self.cell_index is not None:
            where = f" at cell {self.cell_index} (0-based, as in the notebook file"
            where += f"; execution count {self.exec_count})" if self.exec_count is not None else ")"
        return f"{self.name}: FAILED{where}: {self.error} -> {self.executed}"


def execute(path: str | os.PathLike, *, results_dir: str | os.PathLike = "results", smoke: bool = False,
            device: str | None = None, executor: str | None = None, parameters: Mapping | None = None,
            kernel_name: str = KERNEL_NAME, cell_timeout: int | None = None) -> NotebookRun:
    """Execute one notebook into its run directory, render it to HTML, and report the outcome.

    Never raises for a failing notebook: the failure (error, cell index) is in the NotebookRun
    and in run.json (status "failed").
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError

    path = Path(path)
    name = path.stem
    effective, inject = run_parameters(path, results_dir=results_dir, smoke=smoke, device=device, executor=executor,
                                       overrides=parameters)
    run_id = effective.get("run_id") or run_id_for(effective)
    run_dir = Path(results_dir) / name / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    executed = run_dir / f"{name}.ipynb"
    log.info("executing %s -> %s", path.name, run_dir)
    t0 = time.perf_counter()
    error = cell_index = exec_count = None
    try:
        papermill.execute_notebook(str(path), str(executed), parameters=inject, kernel_name=kernel_name,
                                   cwd=str(repo_root()), progress_bar=False, log_output=False,
                                   execution_timeout=cell_timeout)
    except PapermillExecutionError as exc:
        error, exec_count = f"{exc.ename}: {exc.evalue}", exc.exec_count
        cell_index = _source_cell_index(path, exc.source, exc.cell_index)
    except Exception as exc:  # kernel death, missing kernel, unreadable notebook
        error = f"{type(exc).__name__}: {exc}"
    wall = time.perf_counter() - t0
    html_path = render_html(executed) if executed.exists() else None
    status = "failed" if error else "success"
    run = Run(run_dir)
    if not run.json_path.exists():  # the notebook failed before creating its run
        run.update(notebook=name, run_id=run_id, status="running", parameters=effective, start=None)
    meta = run.meta
    fields = {"executed_notebook": executed.name, "html": html_path.name if html_path else None,
              "reproduce": {"smoke": smoke, "injected": inject, "wall_s": round(wall, 1)}}
    if error:
        run.finish("failed", error=error, failed_cell=cell_index, **fields)
    elif meta.get("status") == "running":  # the notebook did not close its run itself
        run.finish("success", **fields)
    else:
        run.update(**fields)
    if status == "success" and not smoke and not parameters:  # default parameters: the header's claim
        stale = runtime_check(path, wall)
        if stale:
            log.warning("%s", stale)
            run.update(runtime_warning=stale)
    outcome = NotebookRun(name, status, run_dir, executed if executed.exists() else None, html_path,
                          wall, error, cell_index, exec_count)
    (log.info if status == "success" else log.error)("%s", outcome.describe())
    return outcome


def _source_cell_index(path: Path, source: str, fallback: int) -> int:
    """The failing cell's index in the notebook as committed (papermill's index counts its injected
    parameters cell); found by the cell's source, else papermill's index minus the injected cell."""
    cells = _read(path)["cells"]
    for i, cell in enumerate(cells):
        if cell["cell_type"] == "code" and _source(cell) == source:
            return i
    return fallback - 1 if fallback and parameters_cell({"cells": cells}) is not None else fallback


def render_html(ipynb: str | os.PathLike) -> Path:
    """Render an executed notebook to HTML next to it (nbconvert; no browser, no re-execution)."""
    import nbconvert
    import nbformat

    ipynb = Path(ipynb)
    body, _ = nbconvert.HTMLExporter().from_notebook_node(nbformat.read(ipynb, as_version=4))
    return atomic_write_text(ipynb.with_suffix(".html"), body)


def select(paths: Sequence[Path], only: Sequence[str] | None) -> list[Path]:
    """The notebooks named by `only` (full stem or a prefix such as "01"); all when `only` is empty."""
    if not only:
        return list(paths)
    chosen = [p for p in paths if any(p.stem == o or p.stem.startswith(o) for o in only)]
    if not chosen:
        raise ValueError(f"--only {list(only)} matches none of {[p.stem for p in paths]}")
    return chosen


def reproduce(results_dir: str | os.PathLike = "results", *, smoke: bool = False,
              only: Sequence[str] | None = None, device: str | None = None, executor: str | None = None,
              notebooks: str | os.PathLike | None = None, kernel_name: str = KERNEL_NAME,
              cell_timeout: int | None = None) -> list[NotebookRun]:
    """Execute every notebook (or those in `only`) in order, render them, and write the index.

    Returns one NotebookRun per notebook; failures do not stop the others.
    """
    paths = list_notebooks(notebooks)
    if notebooks is None:
        missing = [n for n in EXPECTED if n not in {p.stem for p in paths}]
        if missing:
            log.warning("running the %d notebooks that exist; not written yet: %s", len(paths), ", ".join(missing))
    paths = select(paths, only)
    Path(results_dir).mkdir(parents=True, exist_ok=True)
    outcomes = [execute(p, results_dir=results_dir, smoke=smoke, device=device, executor=executor,
                        kernel_name=kernel_name, cell_timeout=cell_timeout) for p in paths]
    write_index(results_dir)
    return outcomes

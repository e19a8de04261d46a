"""Run the notebooks headlessly: papermill execution, HTML renders, the results index, `reproduce`.

`reproduce()` (what `python -m dplib reproduce` and `make reproduce` call) executes every notebook
in `notebooks/` in name order with papermill, on the `python3` kernel — which jupyter_client
starts with the current interpreter (`sys.executable`), i.e. the venv's Python. Each notebook runs
into its run directory `results/<notebook>/<run_id>/` (the run id is derived from its effective
parameters, as `dplib.results.run_id_for` does, and passed in as the `run_id` parameter), which
then holds the executed `.ipynb` and its `.html` render. `results/index.html` links every run,
its figures and its headline table. A failing notebook is reported with its failing cell; the
others still run.

Parameters a notebook receives (only those its `parameters` cell declares):
    results_dir, progress=False, interactive=False, run_id, device and executor (when given), and with
    `smoke=True` the notebook's own smoke parameters, stored in its metadata under
    `metadata["dplib"]["smoke"]` (a dict of literals: tiny sizes that run in well under a minute).
"""

from __future__ import annotations

import ast
import html
import io
import json
import logging
import os
import re
import time
import tokenize
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .results import Run, atomic_write_text, find_runs, open_run, read_frame, run_id_for

log = logging.getLogger(__name__)

# The study's notebooks (SPEC §Experiments); reproduce runs what exists and names what is missing.
EXPECTED = ("00_quickstart", "01_entropy_sweep", "02_outlier_study", "03_lm_targets",
            "04_soft_vs_hard", "05_bottleneck", "06_distribution_proposers")
KERNEL_NAME = "python3"  # jupyter_client starts "python" kernelspecs with sys.executable


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def notebooks_dir() -> Path:
    return repo_root() / "notebooks"


def list_notebooks(folder: str | os.PathLike | None = None) -> list[Path]:
    """The notebooks of `folder` (default: the repository's notebooks/), sorted by name."""
    folder = Path(folder) if folder is not None else notebooks_dir()
    return sorted(p for p in folder.glob("*.ipynb") if not p.name.startswith("."))


# --------------------------------------------------------------------------------------------
# Parameters.
# --------------------------------------------------------------------------------------------


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
    from .results import RESULTS_DIR
    from .results import start_run as _start_run

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


# --------------------------------------------------------------------------------------------
# Execution.
# --------------------------------------------------------------------------------------------


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
    out = ipynb.with_suffix(".html")
    out.write_text(body, encoding="utf-8")
    return out


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


# --------------------------------------------------------------------------------------------
# The index page.
# --------------------------------------------------------------------------------------------


VERDICT_TABLE = "verdicts"  # tables/verdicts.csv: the notebook's verdicts (dplib.findings), shown in the index
_CSS = ("body{font-family:sans-serif;max-width:1200px;margin:auto;padding:0 12px;color:#222}"
        "table{border-collapse:collapse;font-size:13px;margin:6px 0}td,th{padding:3px 7px;border-bottom:1px solid #eee;"
        "text-align:left;vertical-align:top}th{background:#f6f6f6}"
        ".row{display:flex;gap:18px;align-items:flex-start;flex-wrap:wrap}"
        "figure{margin:0}figure img{width:380px;border:1px solid #ddd}figcaption{font-size:12px;color:#555;max-width:380px}"
        ".thumbs img{width:180px;margin:3px;border:1px solid #ddd}"
        ".failed,.fails{color:#b00}.success,.holds{color:#070}.running,.undecided{color:#a60}"
        "td.fails,td.holds,td.undecided{font-weight:bold}details{margin:6px 0}code{font-size:12px}")


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _latest(runs: Sequence[Run]) -> list[Run]:
    """Runs newest first (by end, else start time)."""
    return sorted(runs, key=lambda r: r.meta.get("end") or r.meta.get("start") or "", reverse=True)


def _run_time(meta: Mapping) -> str:
    wall = meta.get("duration_s")
    if wall is None:
        wall = (meta.get("reproduce") or {}).get("wall_s")
    return f"{wall:.0f} s ({wall / 60:.1f} min)" if wall is not None else "run time unknown"


def _verdicts(run: Run):
    """The run's verdict table (tables/verdicts.csv), None if it has none; raises if it is unreadable."""
    if VERDICT_TABLE not in run.tables():
        return None
    return run.load_table(VERDICT_TABLE)


def _headline_rows(table):
    """The headline rows of a verdict table read back from CSV (True/False, or their strings)."""
    if "headline" not in table:
        return table
    return table[table["headline"].astype(str).str.strip().str.lower().isin(["true", "1", "1.0"])]


def _verdict_counts(table) -> str:
    if table is None:
        return "no verdicts"
    head = _headline_rows(table)
    counts = head["verdict"].value_counts()
    return ", ".join(f"<span class='{v}'>{int(counts.get(v, 0))} {v}</span>" for v in ("holds", "fails", "undecided"))


def _verdict_html(run: Run, root: Path) -> str:
    """The headline verdicts of a run as a table: claim, scope, statistic, value, interval, n, verdict."""
    try:
        return _verdict_table_html(run, root)
    except Exception as exc:  # a broken table should not break the index
        return f"<p class='failed'>could not show the verdicts: {_e(type(exc).__name__)}: {_e(exc)}</p>"


def _verdict_table_html(run: Run, root: Path) -> str:
    table = _verdicts(run)
    if table is None:
        return "<p>No verdicts: this notebook states no claim (or this run did not reach its verdict cell).</p>"
    head = _headline_rows(table)
    rel = run.table_path(VERDICT_TABLE).relative_to(root).as_posix()
    level = f"{float(head['level'].iloc[0]):.0%}" if len(head) and "level" in head else "95%"
    rows = ["<table class='verdicts'><tr><th>claim</th><th>scope</th><th>statistic</th><th>value</th>"
            f"<th>{_e(level)} interval</th><th>n</th><th>holds?</th></tr>"]
    for r in head.to_dict("records"):
        rows.append(f"<tr><td>{_e(r['claim'])}</td><td>{_e(r['scope'])}</td><td>{_e(r['statistic'])}</td>"
                    f"<td>{_e(_num(r['value']))}</td><td>[{_e(_num(r['ci_low']))}, {_e(_num(r['ci_high']))}]</td>"
                    f"<td>{_e(r['n'])}</td><td class='{_e(r['verdict'])}' title='{_e(r.get('note', ''))}'>"
                    f"{_e(r['verdict'])}</td></tr>")
    rows.append("</table>")
    detail = len(table) - len(head)
    more = f" and {detail} per-bin rows" if detail else ""
    return "".join(rows) + f"<p>All {len(head)} headline verdicts{more}: <a href='{_e(rel)}'>{_e(Path(rel).name)}</a></p>"


def _num(v) -> str:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return str(v)
    return f"{v:.3g}"


def _figure_html(run: Run, root: Path) -> str:
    """The run's main figure as a thumbnail linking to the full image, with its title as alt text."""
    fig = run.main_figure()
    if fig is None:
        return "<p>No figure.</p>"
    rel = fig.relative_to(root).as_posix()
    alt = run.figure_alt(fig)
    return (f"<figure><a href='{_e(rel)}'><img src='{_e(rel)}' alt='{_e(alt)}'></a>"
            f"<figcaption>{_e(alt)}</figcaption></figure>")


def _parameters_html(meta: Mapping) -> str:
    params = meta.get("parameters") or {}
    rows = "".join(f"<tr><td><code>{_e(k)}</code></td><td><code>{_e(json.dumps(v, ensure_ascii=False))}</code></td></tr>"
                   for k, v in params.items())
    return f"<details><summary>parameters ({len(params)})</summary><table>{rows}</table></details>"


def _headline(run: Run, max_rows: int = 20) -> str:
    meta = run.meta
    rel = meta.get("headline_table")
    path = run.path / rel if rel else None
    if path is None or not path.exists():
        csvs = sorted((run.path / "tables").glob("*.csv")) if (run.path / "tables").exists() else []
        path = csvs[0] if csvs else None
    if path is None:
        return ""
    try:
        df = read_frame(path)
    except Exception as exc:  # a broken table should not break the index
        return f"<p>could not read {html.escape(path.name)}: {html.escape(str(exc))}</p>"
    more = f" (first {max_rows} of {len(df)} rows)" if len(df) > max_rows else ""
    return (f"<details><summary>table <code>{html.escape(path.name)}</code>{more}</summary>"
            + df.head(max_rows).to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0) + "</details>")


def _links(run: Run, root: Path) -> str:
    meta = run.meta
    rel = run.path.relative_to(root).as_posix()
    links = []
    if meta.get("html"):
        links.append(f"<a href='{_e(rel)}/{_e(meta['html'])}'>executed notebook (HTML)</a>")
    if meta.get("executed_notebook"):
        links.append(f"<a href='{_e(rel)}/{_e(meta['executed_notebook'])}'>{_e(meta['executed_notebook'])}</a>")
    links.append(f"<a href='{_e(rel)}/run.json'>run.json</a>")
    return " · ".join(links)


def _run_html(run: Run, root: Path) -> list[str]:
    meta = run.meta
    status = meta.get("status", "?")
    git = meta.get("git") or {}
    parts = [f"<p>run <code>{_e(run.run_id)}</code> <span class='{_e(status)}'>{_e(status)}</span>; "
             f"started {_e(meta.get('start'))}; {_e(_run_time(meta))}; git {_e(str(git.get('commit') or '')[:10])}"
             f"{' (dirty)' if git.get('dirty') else ''} — {_links(run, root)}</p>"]
    if meta.get("error"):
        parts.append(f"<p class='failed'>cell {_e(meta.get('failed_cell'))}: {_e(meta['error'])}</p>")
    if meta.get("runtime_warning"):
        parts.append(f"<p class='running'>{_e(meta['runtime_warning'])}</p>")
    parts.append(f"<div class='row'>{_figure_html(run, root)}<div>{_verdict_html(run, root)}</div></div>")
    parts.append(_parameters_html(meta))
    others = [f for f in run.figures() if f != run.main_figure()]
    if others:
        thumbs = "".join(f"<a href='{_e(f.relative_to(root).as_posix())}'><img src='{_e(f.relative_to(root).as_posix())}' "
                         f"alt='{_e(run.figure_alt(f))}' title='{_e(run.figure_alt(f))}'></a>" for f in others)
        parts.append(f"<details><summary>{len(others)} more figures</summary><div class='thumbs'>{thumbs}</div></details>")
    parts.append(_headline(run))
    return parts


def write_index(results_dir: str | os.PathLike = "results") -> Path:
    """Write results/index.html, the shared report: per notebook, its latest run's verdicts (claim, number,
    interval, holds?), main figure as a thumbnail, run time, parameters and links to the executed HTML;
    older runs listed below. Self-contained: relative links only, no script, no network, so it opens
    from file:// (`scripts/render_index.py` renders it in headless Chromium)."""
    root = Path(results_dir)
    runs = find_runs("*/*", root)
    by_notebook = {nb: _latest([r for r in runs if r.notebook == nb]) for nb in sorted({r.notebook for r in runs})}
    parts = ["<!doctype html><html lang='en'><head><meta charset='utf-8'><title>dplib results</title>",
             f"<style>{_CSS}</style></head><body>", "<h1>dplib results</h1>"]
    if not runs:
        parts.append("<p>No runs yet: <code>python -m dplib reproduce</code>.</p>")
    else:
        parts.append("<table class='summary'><tr><th>notebook</th><th>latest run</th><th>run time</th>"
                     "<th>headline verdicts</th></tr>")
        for nb, group in by_notebook.items():
            meta, status = group[0].meta, group[0].meta.get("status", "?")
            try:
                counts = _verdict_counts(_verdicts(group[0]))
            except Exception:
                counts = "unreadable verdicts"
            parts.append(f"<tr><td><a href='#{_e(nb)}'>{_e(nb)}</a></td><td class='{_e(status)}'>{_e(status)}</td>"
                         f"<td>{_e(_run_time(meta))}</td><td>{counts}</td></tr>")
        parts.append("</table>")
    for nb, group in by_notebook.items():
        parts.append(f"<section id='{_e(nb)}'><h2>{_e(nb)}</h2>")
        parts += _run_html(group[0], root)
        if len(group) > 1:
            parts.append(f"<details><summary>{len(group) - 1} older runs</summary><ul>")
            for run in group[1:]:
                status = run.meta.get("status", "?")
                parts.append(f"<li><code>{_e(run.run_id)}</code> <span class='{_e(status)}'>{_e(status)}</span>, "
                             f"{_e(_run_time(run.meta))} — {_links(run, root)}</li>")
            parts.append("</ul></details>")
        parts.append("</section>")
    parts.append("</body></html>")
    root.mkdir(parents=True, exist_ok=True)
    out = root / "index.html"
    atomic_write_text(out, "\n".join(parts))
    return out


# --------------------------------------------------------------------------------------------
# The committed-notebook contract (STYLE §Notebooks), checked by the tests.
# --------------------------------------------------------------------------------------------


def _code_without_magics(src: str) -> str:
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in src.splitlines())


# The header's runtime sentence: "**Runtime** at default parameters: about 10 minutes ...".
_RUNTIME = re.compile(r"\*\*Runtime\*\* at default parameters: about (\d+(?:\.\d+)?) (minutes?|seconds?)")
RUNTIME_TOLERANCE = 2.0  # a full run outside [stated / 2, stated × 2] is reported: the header is no longer true


def stated_runtime_s(path: str | os.PathLike) -> float | None:
    """The runtime at default parameters the notebook's header states, in seconds (None if it states none)."""
    cells = _read(path).get("cells", [])
    match = _RUNTIME.search(_source(cells[0])) if cells else None
    if match is None:
        return None
    return float(match.group(1)) * (60.0 if match.group(2).startswith("minute") else 1.0)


def runtime_check(path: str | os.PathLike, wall_s: float) -> str | None:
    """None when a run at default parameters took about what the header states; else what to fix."""
    stated = stated_runtime_s(path)
    if stated is None or stated / RUNTIME_TOLERANCE <= wall_s <= stated * RUNTIME_TOLERANCE:
        return None
    return (f"{Path(path).name}: its header states about {stated:.0f} s at default parameters, but this run took "
            f"{wall_s:.0f} s; update the header's **Runtime** sentence")


def notebook_problems(path: str | os.PathLike) -> list[str]:
    """What breaks the committed-notebook contract; [] when the notebook is clean.

    Checked: nbformat 4.5 or later with a unique id on every cell (JupyterLab adds missing ids on
    opening, which marks an untouched notebook modified); outputs stripped and execution counts
    null; the first cell is markdown and states the runtime in the parseable form `stated_runtime_s`
    reads; exactly one `parameters` cell, of literal assignments with a trailing comment each; smoke
    parameters in the metadata, each declared in the parameters cell; no function, class or lambda
    definitions anywhere.
    """
    nb = _read(path)
    problems = []
    if nb.get("nbformat") != 4 or nb.get("nbformat_minor", 0) < 5:
        problems.append(f"nbformat is {nb.get('nbformat')}.{nb.get('nbformat_minor')}, expected 4.5 or later "
                        "(cell ids); re-save it with nbformat ≥ 5.1 or JupyterLab")
    cells = nb.get("cells", [])
    ids = [c.get("id") for c in cells]
    if None in ids or len(set(ids)) != len(ids):
        problems.append("every cell needs a unique id (nbformat 4.5)")
    if not cells or cells[0]["cell_type"] != "markdown":
        problems.append("the first cell must be a markdown header (question, what it writes, runtime)")
    elif stated_runtime_s(path) is None:
        problems.append("the markdown header does not state the runtime at default parameters as "
                        "'**Runtime** at default parameters: about N minutes'")
    tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(tagged) != 1:
        problems.append(f"expected exactly one cell tagged 'parameters', found {len(tagged)}")
    for i, cell in enumerate(cells):
        if cell["cell_type"] != "code":
            continue
        if cell.get("outputs"):
            problems.append(f"cell {i} has outputs (strip them)")
        if cell.get("execution_count") is not None:
            problems.append(f"cell {i} has execution_count {cell['execution_count']} (strip it)")
        try:
            tree = ast.parse(_code_without_magics(_source(cell)))
        except SyntaxError as exc:
            problems.append(f"cell {i} does not parse: {exc}")
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Lambda):
                problems.append(f"cell {i} defines {type(node).__name__} (move it into dplib)")
    if len(tagged) == 1:
        problems += _parameters_problems(_source(tagged[0]))
        declared = set(default_parameters(path)) if not problems else set()
        smoke = nb.get("metadata", {}).get("dplib", {}).get("smoke")
        if not isinstance(smoke, dict) or not smoke:
            problems.append("metadata['dplib']['smoke'] (the smoke parameters) is missing")
        elif declared and set(smoke) - declared:
            problems.append(f"smoke parameters {sorted(set(smoke) - declared)} are not in the parameters cell")
    return problems


def _parameters_problems(src: str) -> list[str]:
    problems = []
    try:
        tree = ast.parse(src)
    except SyntaxError as exc:
        return [f"the parameters cell does not parse: {exc}"]
    comment_lines = {tok.start[0] for tok in tokenize.generate_tokens(io.StringIO(src).readline)
                     if tok.type == tokenize.COMMENT}
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            problems.append(f"parameters cell line {node.lineno}: only `name = literal` assignments belong there")
            continue
        try:
            ast.literal_eval(node.value)
        except ValueError:
            problems.append(f"parameters cell: {node.targets[0].id} is not a literal (nothing may be derived there)")
        if node.end_lineno not in comment_lines:
            problems.append(f"parameters cell: {node.targets[0].id} has no trailing comment")
    for name in ("results_dir", "progress"):
        if name not in {n.targets[0].id for n in tree.body if isinstance(n, ast.Assign)
                        and isinstance(n.targets[0], ast.Name)}:
            problems.append(f"parameters cell lacks `{name}`")
    return problems


def open_latest(notebook: str, results_dir: str | os.PathLike = "results") -> Run | None:
    """The most recently finished run of a notebook, or None."""
    runs = find_runs(f"{notebook}/*", results_dir)
    if not runs:
        return None
    return open_run(max(runs, key=lambda r: r.meta.get("end") or "").path)

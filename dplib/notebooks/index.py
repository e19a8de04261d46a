"""`results/index.html`: per notebook, its verdicts, main figure, run time, parameters and links;
self-contained (no server, no network).
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..files import atomic_write_text
from ..results import Run, find_runs, read_frame

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

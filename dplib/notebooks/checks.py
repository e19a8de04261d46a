"""Checks of the notebooks themselves: what a notebook must hold (`notebook_problems`) and whether its
stated runtime is still true (`runtime_check`).
"""

from __future__ import annotations

import ast
import io
import os
import re
import tokenize
from pathlib import Path

from .params import _read, _source, default_parameters


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

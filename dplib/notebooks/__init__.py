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

The parts, bottom to top: `params` (the notebooks, their parameters cell, `start_run`), `checks`
(what a notebook must hold, its stated runtime), `index` (results/index.html), `execute` (papermill,
HTML, `reproduce`).
"""

from .checks import RUNTIME_TOLERANCE, notebook_problems, runtime_check, stated_runtime_s
from .execute import NotebookRun, execute, render_html, reproduce, select
from .index import VERDICT_TABLE, write_index
from .params import (
    EXPECTED,
    KERNEL_NAME,
    cell_parameters,
    default_parameters,
    list_notebooks,
    notebook_path,
    notebooks_dir,
    parameters_cell,
    repo_root,
    run_parameters,
    smoke_parameters,
    start_run,
)

__all__ = [
    "EXPECTED", "KERNEL_NAME", "RUNTIME_TOLERANCE", "VERDICT_TABLE", "NotebookRun", "cell_parameters",
    "default_parameters", "execute", "list_notebooks", "notebook_path", "notebook_problems", "notebooks_dir",
    "parameters_cell", "render_html", "repo_root", "reproduce", "run_parameters", "runtime_check", "select",
    "smoke_parameters", "start_run", "stated_runtime_s", "write_index",
]

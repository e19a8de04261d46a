"""Run directories: where every experiment writes its metadata, tables and figures.

A run lives in `results/<notebook>/<run_id>/`:

    run.json        parameters, method configs, seeds, package versions, git commit + dirty flag,
                    device, start/end times, status ("running" → "success" | "failed")
    tables/         tidy tables: CSV for per-target summaries, parquet for per-step traces
    figures/        PNG figures
    tables/<sweep>_cells.csv   the keys of the cells a sweep used, in the shared cell store
                    (`dplib.store`, default `results/cells/`), which holds the computed cells
    <notebook>.ipynb, <notebook>.html   the executed notebook and its render (`dplib reproduce`)

The run id is derived from the parameters (`run_id_for`): re-running with the same parameters
lands in the same directory, so a killed sweep resumes from its finished batches. Parameters that
change where or how verbosely a run writes, not what it computes (`results_dir`, `progress`,
`run_id`, `interactive`), are left out of the identity. Pass `run_id=` to choose a name instead.

Every file is written atomically (a temporary file in the same directory, then `os.replace`), so
a killed process never leaves a half-written table behind. run.json is read, changed and written
under an exclusive lock (`locked`), so several processes recording into one run lose nothing.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pandas as pd

from .files import atomic_write, atomic_write_text

log = logging.getLogger(__name__)

RESULTS_DIR = "results"
# Parameters that do not change what a run computes: left out of the run id.
NOT_IDENTITY = frozenset({"results_dir", "progress", "run_id", "interactive", "executor"})
PACKAGES = ("dplib", "torch", "transformers", "numpy", "pandas", "pyarrow", "seaborn", "matplotlib",
            "papermill", "scipy")
STATUSES = ("running", "success", "failed")


# --------------------------------------------------------------------------------------------
# Identity: canonical JSON, hashes, run ids.
# --------------------------------------------------------------------------------------------


def to_jsonable(value):
    """Plain JSON values from dataclasses, enums, paths, numpy scalars, tuples, sets."""
    import dataclasses
    import enum

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value))
    if isinstance(value, enum.Enum):
        return to_jsonable(value.value)
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, set | frozenset):
        return sorted(to_jsonable(v) for v in value)
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        return value.item()  # numpy / torch scalars
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def stable_hash(value, n: int = 12) -> str:
    """`n` hex digits of the SHA-256 of `value`'s canonical JSON (sorted keys): equal values, equal hash."""
    text = json.dumps(to_jsonable(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def run_id_for(params: Mapping) -> str:
    """The run id of a parameter set: "run-" + a hash of the parameters that change results."""
    return "run-" + stable_hash({k: v for k, v in params.items() if k not in NOT_IDENTITY}, 10)


# --------------------------------------------------------------------------------------------
# Environment: versions, git state, device.
# --------------------------------------------------------------------------------------------


def package_versions(names=PACKAGES) -> dict[str, str | None]:
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_state(path: str | os.PathLike | None = None) -> dict:
    """{"commit": sha or None, "dirty": bool or None} of the repository holding `path` (default: dplib's)."""
    cwd = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                                capture_output=True, text=True, timeout=10, check=True).stdout
        return {"commit": commit, "dirty": bool(status.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def device_info(device=None) -> dict:
    """What ran the computation: the requested device, CPU count, and the GPU name where there is one."""
    info = {"requested": None if device is None else str(device), "host": platform.node(),
            "platform": platform.platform(), "cpu_count": os.cpu_count()}
    torch = sys.modules.get("torch")  # record torch facts only if the caller already uses torch
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = bool(torch.cuda.is_available())
        if info["cuda"]:
            info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------
# Atomic writes.
# --------------------------------------------------------------------------------------------


def write_frame(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a DataFrame atomically (`files.atomic_write`) as CSV or parquet, chosen by the suffix."""
    path = Path(path)
    if path.suffix not in (".csv", ".parquet"):
        raise ValueError(f"unknown table format {path.suffix!r}: use .csv or .parquet")

    def write(tmp: Path) -> None:
        if path.suffix == ".parquet":
            df.to_parquet(tmp, index=False)
        else:
            # every string quoted: prompt texts can hold \r and other line breaks that csv's
            # minimal quoting leaves bare (and a reader would split the row there)
            df.to_csv(tmp, index=False, quoting=csv.QUOTE_NONNUMERIC)

    return atomic_write(path, write)


@contextlib.contextmanager
def locked(path: str | os.PathLike):
    """Hold an exclusive lock on `path` (through the file `.<name>.lock` beside it) for a read-modify-write.

    An OS advisory lock (flock; on Windows, msvcrt): released when the process ends, even killed,
    so no stale lock outlives its holder. Every writer of the file must take it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a+b") as fh:
        try:
            import fcntl

            fcntl.flock(fh, fcntl.LOCK_EX)
        except ImportError:  # Windows
            import msvcrt

            fh.seek(0)
            msvcrt.locking(fh.fileno(), msvcrt.LK_LOCK, 1)
        yield  # closing the file releases the lock


def read_frame(path: str | os.PathLike) -> pd.DataFrame:
    path = Path(path)
    return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)


# --------------------------------------------------------------------------------------------
# The run directory.
# --------------------------------------------------------------------------------------------


@dataclass
class Run:
    """A run directory `results/<notebook>/<run_id>/`; see the module docstring for its layout."""

    path: Path

    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def notebook(self) -> str:
        return self.path.parent.name

    @property
    def json_path(self) -> Path:
        return self.path / "run.json"

    @property
    def meta(self) -> dict:
        """The current content of run.json."""
        return json.loads(self.json_path.read_text())

    @contextlib.contextmanager
    def editing(self):
        """Yield run.json's content as a dict, and write it back atomically when the block ends,
        all under the run's lock: concurrent edits from several processes are applied one by one."""
        with locked(self.json_path):
            meta = self.meta if self.json_path.exists() else {}
            yield meta
            atomic_write_text(self.json_path, json.dumps(meta, indent=2, ensure_ascii=False) + "\n")

    def update(self, **fields) -> dict:
        """Merge `fields` into run.json (top level) and write it atomically; returns the new content."""
        with self.editing() as meta:
            meta.update(to_jsonable(fields))
        return meta

    def record(self, section: str, key: str, value) -> dict:
        """Set run.json[section][key] = value (e.g. one sweep's configs under "sweeps")."""
        with self.editing() as meta:
            meta.setdefault(section, {})[key] = to_jsonable(value)
        return meta

    def table_path(self, name: str, fmt: str = "csv") -> Path:
        return self.path / "tables" / f"{name}.{fmt}"

    def save_table(self, df: pd.DataFrame, name: str, fmt: str = "csv", *, headline: bool = False) -> Path:
        """Write `df` to tables/<name>.<fmt> ("csv" for summaries, "parquet" for traces).

        `headline=True` marks it as the table the results index shows for this run.
        """
        if fmt not in ("csv", "parquet"):
            raise ValueError(f"fmt must be 'csv' or 'parquet', got {fmt!r}")
        path = write_frame(df, self.table_path(name, fmt))
        if headline:
            self.update(headline_table=str(path.relative_to(self.path)))
        return path

    def load_table(self, name: str) -> pd.DataFrame:
        for fmt in ("csv", "parquet"):
            if self.table_path(name, fmt).exists():
                return read_frame(self.table_path(name, fmt))
        raise FileNotFoundError(f"no table {name!r} in {self.path / 'tables'}; have: {self.tables()}")

    def tables(self) -> list[str]:
        folder = self.path / "tables"
        return sorted(p.stem for p in folder.glob("*") if p.suffix in (".csv", ".parquet")) if folder.exists() else []

    def save_figure(self, fig, name: str, *, dpi: int = 120, main: bool = False, alt: str | None = None) -> Path:
        """Save a matplotlib Figure as figures/<name>.png (atomically); returns the path.

        Its alt text (`alt`, else the figure's title: its suptitle or its first axes' title) is kept in
        run.json under "figures", for the results index. `main=True` marks it as the run's main
        figure, the one the index shows as a thumbnail.
        """
        path = atomic_write(self.path / "figures" / f"{name}.png",
                            lambda tmp: fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png"))
        with self.editing() as meta:
            meta.setdefault("figures", {})[path.name] = alt or figure_title(fig) or name.replace("_", " ")
            if main:
                meta["main_figure"] = str(path.relative_to(self.path))
        return path

    def figure_alt(self, path: Path) -> str:
        """The alt text recorded for a saved figure (its title), else its name in words."""
        meta = self.meta if self.json_path.exists() else {}
        return (meta.get("figures") or {}).get(path.name) or path.stem.replace("_", " ")

    def main_figure(self) -> Path | None:
        """The figure marked main (`save_figure(..., main=True)`), else the first saved one, else None."""
        meta = self.meta if self.json_path.exists() else {}
        rel = meta.get("main_figure")
        if rel and (self.path / rel).exists():
            return self.path / rel
        figures = self.figures()
        return figures[0] if figures else None

    def figures(self) -> list[Path]:
        folder = self.path / "figures"
        return sorted(folder.glob("*.png")) if folder.exists() else []

    def finish(self, status: str = "success", **fields) -> dict:
        """Record the end: status ("success" or "failed"), end time, duration."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        with self.editing() as meta:
            end = _now()
            start = meta.get("start")
            duration = None
            if start:
                duration = (_dt.datetime.fromisoformat(end) - _dt.datetime.fromisoformat(start)).total_seconds()
            meta.update(to_jsonable({"status": status, "end": end, "duration_s": duration, **fields}))
        return meta


def figure_title(fig) -> str:
    """A matplotlib Figure's title: its suptitle, else the first axes title found ("" if none)."""
    sup = getattr(fig, "_suptitle", None)
    if sup is not None and sup.get_text().strip():
        return " ".join(sup.get_text().split())
    for ax in fig.get_axes():
        if ax.get_title().strip():
            return " ".join(ax.get_title().split())
    return ""


def start_run(notebook: str, params: Mapping, *, results_dir: str | os.PathLike = RESULTS_DIR,
              run_id: str | None = None, device=None, seeds=None, configs: Mapping | None = None) -> Run:
    """Create (or re-open) the run directory of `params` and write run.json with status "running".

    Args:
        notebook: the experiment's name, e.g. "01_entropy_sweep" (the first directory level).
        params: the run's parameters (plain values); they define the run id unless `run_id` is given.
        results_dir: the results root (default "results").
        run_id: an explicit run id; None derives it from `params` (same parameters → same directory).
        device, seeds, configs: recorded in run.json (the sweep runner adds its configs itself).
    A re-opened run keeps its first start time and counts its attempts, so a resumed run's history
    stays visible.
    """
    run_id = run_id or run_id_for(params)
    run = Run(Path(results_dir) / notebook / run_id)
    run.path.mkdir(parents=True, exist_ok=True)
    environment = dict(versions=package_versions(), git=git_state(), device=device_info(device))
    with run.editing() as meta:  # one locked edit: two processes opening the run both count
        now = _now()
        meta.update(to_jsonable(dict(
            notebook=notebook, run_id=run_id, status="running",
            start=meta.get("start", now), attempt_start=now, attempts=int(meta.get("attempts", 0)) + 1,
            end=None, duration_s=None,
            parameters=dict(params), seeds=seeds if seeds is not None else params.get("seed"),
            configs=dict(configs or meta.get("configs", {})), sweeps=meta.get("sweeps", {}),
            **environment, command=" ".join(sys.argv[:1]),
        )))
    log.info("run directory %s (attempt %d)", run.path, meta["attempts"])
    return run


def open_run(path: str | os.PathLike) -> Run:
    """An existing run directory (one holding run.json)."""
    run = Run(Path(path))
    if not run.json_path.exists():
        raise FileNotFoundError(f"{path} is not a run directory (no run.json)")
    return run


def find_runs(pattern: str = "*/*", results_dir: str | os.PathLike = RESULTS_DIR) -> list[Run]:
    """Run directories under `results_dir` matching the glob `pattern` ("<notebook>/<run_id>"), sorted."""
    root = Path(results_dir)
    return [Run(p.parent) for p in sorted(root.glob(f"{pattern}/run.json"))]


def runs_frame(pattern: str = "*/*", results_dir: str | os.PathLike = RESULTS_DIR) -> pd.DataFrame:
    """One row per run: notebook, run_id, status, start, end, duration_s, git_commit, git_dirty, path."""
    rows = []
    for run in find_runs(pattern, results_dir):
        m = run.meta
        rows.append({"notebook": run.notebook, "run_id": run.run_id, "status": m.get("status"),
                     "start": m.get("start"), "end": m.get("end"), "duration_s": m.get("duration_s"),
                     "git_commit": (m.get("git") or {}).get("commit"),
                     "git_dirty": (m.get("git") or {}).get("dirty"), "path": str(run.path)})
    return pd.DataFrame(rows, columns=["notebook", "run_id", "status", "start", "end", "duration_s",
                                       "git_commit", "git_dirty", "path"])


def load_runs(pattern: str = "*/*", table: str = "results", *,
              results_dir: str | os.PathLike = RESULTS_DIR, status: str | None = None) -> pd.DataFrame:
    """Concatenate one table across runs, with each run's metadata as columns.

    Args:
        pattern: glob over "<notebook>/<run_id>" under `results_dir`, e.g. "01_entropy_sweep/*".
        table: the table name (tables/<table>.csv or .parquet).
        status: keep only runs with this status (e.g. "success"); None keeps all.
    Returns: the rows of every matching run's table, plus `notebook`, `run_id` (if the table lacks
    it), `run_status`, `git_commit` and one `param_<name>` column per run parameter. Runs without
    the table are skipped (with a log message).
    """
    frames = []
    for run in find_runs(pattern, results_dir):
        m = run.meta
        if status is not None and m.get("status") != status:
            continue
        try:
            df = run.load_table(table)
        except FileNotFoundError:
            log.info("run %s has no table %r; skipped", run.path, table)
            continue
        df = df.copy()
        df.insert(0, "notebook", run.notebook)
        if "run_id" not in df:
            df.insert(1, "run_id", run.run_id)
        df["run_status"] = m.get("status")
        df["git_commit"] = (m.get("git") or {}).get("commit")
        for key, value in (m.get("parameters") or {}).items():
            df[f"param_{key}"] = json.dumps(value) if isinstance(value, list | dict) else value
        frames.append(df)
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames, ignore_index=True)

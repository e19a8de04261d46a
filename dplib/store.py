"""The cell store: every computed sweep cell, kept once under its key and shared by all runs.

Layout under the store's root (default `results/cells/`, next to the notebooks' run directories):

    <key[:2]>/<key>.trace.parquet   the optimiser's per-step trace
    <key[:2]>/<key>.parquet         the cell's rows (`dplib.cells.result_rows`), written last

A cell is content-addressed: its key (`dplib.cells.cell_key`) hashes the model's weight
fingerprint, the method, config, seed and the batch's target ids and probabilities, so any sweep
of any run or notebook that needs the same cell finds it here instead of recomputing it. Changing
only a run's analysis parameters (a new run directory) therefore recomputes nothing.

Writes are atomic (`dplib.results.write_frame`: a temporary file, then `os.replace`) and the rows
file is written after the trace, so its presence marks a finished cell: a killed writer leaves
either nothing or a complete cell, never one half written. Two processes that compute the same
cell at once both write it; the second replace wins with equal content. The first two key
characters fan the files out over 256 folders, so no folder grows huge.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .results import RESULTS_DIR, Run, read_frame, write_frame

STORE_DIR = "cells"  # the store's folder under the results root


@dataclass(frozen=True)
class CellStore:
    """A content-addressed folder of finished cells; see the module docstring for its layout."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    def rows_path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.parquet"

    def trace_path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.trace.parquet"

    def has(self, key: str) -> bool:
        """Whether the cell is finished (its rows file exists)."""
        return self.rows_path(key).exists()

    def get(self, key: str) -> tuple[pd.DataFrame, pd.DataFrame] | None:
        """(rows, trace) of a finished cell, or None if it is not in the store."""
        if not self.has(key):
            return None
        return read_frame(self.rows_path(key)), read_frame(self.trace_path(key))

    def put(self, key: str, rows: pd.DataFrame, trace: pd.DataFrame) -> Path:
        """Store a finished cell atomically (the trace first: the rows file marks it finished)."""
        write_frame(trace, self.trace_path(key))
        return write_frame(rows, self.rows_path(key))

    def keys(self) -> list[str]:
        """The keys of every finished cell, sorted."""
        return sorted(p.stem for p in self.root.glob("??/*.parquet") if not p.name.endswith(".trace.parquet"))


def store_for(run: Run | None = None, store: CellStore | str | os.PathLike | None = None) -> CellStore | None:
    """The store a sweep uses: `store` when given (a CellStore or a folder), else `<results root>/cells`
    next to the run's notebook folders (`results/cells` for `results/<notebook>/<run_id>`), else None
    (no run, no store: everything stays in memory)."""
    if isinstance(store, CellStore):
        return store
    if store is not None:
        return CellStore(Path(store))
    if run is not None:
        return CellStore(Path(run.path).parent.parent / STORE_DIR)
    return None


def default_store(results_dir: str | os.PathLike = RESULTS_DIR) -> CellStore:
    """The store shared by every run under `results_dir`."""
    return CellStore(Path(results_dir) / STORE_DIR)

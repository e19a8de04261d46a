"""The verdict row (`COLUMNS`), `decide`, the claims' wording, and the input checks every verdict
function shares.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

COLUMNS = ["claim", "scope", "statistic", "value", "ci_low", "ci_high", "level", "n", "null", "direction",
           "verdict", "headline", "note"]
VERDICTS = ("holds", "fails", "undecided")
HUMP_LOW = "moderate entropies are harder to reach than the low end of the range"
HUMP_HIGH = "moderate entropies are harder to reach than the high end of the range"
OUTLIERS = "outlier targets are easier than vanilla targets of the same entropy"
LM_TARGETS = "LM targets are easier than random targets of the same entropy"
BOUND_SHARE = "the output layer alone forces most (> 50 %) of the soft prompt's KL"
PROPOSERS = "an optimised prompt proposes the answer distribution more closely than the best instruction"
PAIRED_CLAIMS = {
    "hard": "hard (real-token) prompts end above soft prompts of the same length",
    "soft_projected": "a soft prompt rounded to its nearest tokens ends above the soft prompt itself",
}


def decide(lo: float, hi: float, *, null: float, direction: str, enough: bool = True) -> str:
    """"holds", "fails" or "undecided" for an interval [lo, hi] against `null` (see the module docstring)."""
    if direction not in ("greater", "less"):
        raise ValueError(f"direction must be 'greater' or 'less', got {direction!r}")
    if not enough or np.isnan(lo) or np.isnan(hi):
        return "undecided"
    above, below = lo > null, hi < null
    if direction == "greater":
        return "holds" if above else "fails" if below else "undecided"
    return "holds" if below else "fails" if above else "undecided"


def _row(claim: str, scope: str, statistic: str, value: float, lo: float, hi: float, n: int, *, null: float,
         direction: str, note: str, level: float, enough: bool = True, min_n: int = 3,
         headline: bool = True) -> dict:
    verdict = decide(lo, hi, null=null, direction=direction, enough=enough)
    if not enough:
        why = f"too few rows to judge (a group has fewer than {min_n})"
    elif verdict == "undecided":
        why = f"the interval includes {null:g}"
    else:
        why = ""
    note = "; ".join(p for p in (note, why) if p)
    return {"claim": claim, "scope": scope, "statistic": statistic, "value": float(value), "ci_low": float(lo),
            "ci_high": float(hi), "level": level, "n": int(n), "null": float(null), "direction": direction,
            "verdict": verdict, "headline": bool(headline), "note": note}


def _frame(rows: list[dict], who: str) -> pd.DataFrame:
    if not rows:
        raise ValueError(f"{who}: no verdict could be formed (no group has the rows it needs)")
    return pd.DataFrame(rows, columns=COLUMNS)


def _checked(df: pd.DataFrame, columns: Sequence[str], value: str, who: str,
             only: tuple[str, Sequence[str]] | None = None) -> tuple[pd.DataFrame, int]:
    """The rows with a finite `value` (and how many were dropped); errors name what is missing.

    only: (column, values): first keep the rows whose `column` is one of `values` (the groups the
    verdict compares), so other rows' missing values (a bound has no string-level KL) are not counted.
    """
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"{who}: expected a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in dict.fromkeys([value, *columns]) if c not in df]
    if missing:
        raise KeyError(f"{who}: columns {missing} not in the table (have {list(df.columns)})")
    if df.empty:
        raise ValueError(f"{who}: the table is empty")
    if only is not None:
        _require_values(df, only[0], [only[1][0]], who)
        df = df[df[only[0]].isin(list(only[1]))]
    finite = np.isfinite(pd.to_numeric(df[value], errors="coerce").to_numpy(float))
    if not finite.any():
        raise ValueError(f"{who}: no row has a finite {value!r} (failed cells?)")
    return df[finite], int((~finite).sum())


def _require_values(df: pd.DataFrame, column: str, values: Sequence[str], who: str) -> None:
    absent = [v for v in values if not (df[column] == v).any()]
    if absent:
        raise ValueError(f"{who}: no rows with {column} = {absent} (have {sorted(map(str, df[column].unique()))})")
_SCOPE_NAMES = {"cfg_prompt_length": "L"}


def scope_label(key: Mapping) -> str:
    """A group key as a short label: model and method names as they are, other columns as name = value."""
    parts = []
    for column, v in key.items():
        if column in ("model", "method", "group", "source", "task"):
            parts.append(str(v))
        else:
            shown = f"{v:g}" if isinstance(v, float | np.floating) else str(v)
            parts.append(f"{_SCOPE_NAMES.get(column, column)} = {shown}")
    return " · ".join(parts) if parts else "all"


def _bin_label(left: float, right: float) -> str:
    return f"bin {left:.2f}–{right:.2f} nats"


def _dropped(n: int, value: str) -> str:
    return f"{n} rows without a finite {value} left out" if n else ""


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)

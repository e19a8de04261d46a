"""Verdicts in words: `combine` several tables, `sentence` per row, `prose` (a markdown paragraph whose
every number comes from the rows) and `show` (the paragraph and the table, in a notebook).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from .rows import COLUMNS, VERDICTS


def combine(*tables: pd.DataFrame) -> pd.DataFrame:
    """Several verdict tables as one (checked to have the verdict schema)."""
    for t in tables:
        missing = [c for c in COLUMNS if c not in t]
        if missing:
            raise KeyError(f"combine: a table lacks the verdict columns {missing}")
    return pd.concat([t[COLUMNS] for t in tables], ignore_index=True)


def _number(v: float) -> str:
    if not np.isfinite(v):
        return "∞" if v > 0 else "−∞" if v < 0 else "n/a"
    return f"{v:.3g}"


def interval(row: Mapping) -> str:
    """"[lo, hi]" of a verdict row, as the prose and the index print it."""
    return f"[{_number(row['ci_low'])}, {_number(row['ci_high'])}]"


def sentence(row: Mapping) -> str:
    """One headline row in words: scope, statistic value, interval, n and the verdict (with why, when
    undecided: the interval contains the null, or it does not but a group has too few rows)."""
    text = (f"{row['scope']}: {_number(row['value'])} ({row['level']:.0%} CI {interval(row)}, n = {row['n']}) "
            f"— **{row['verdict']}**")
    if row["verdict"] == "undecided":
        lo, hi, null = row["ci_low"], row["ci_high"], row["null"]
        straddles = np.isnan(lo) or np.isnan(hi) or lo <= null <= hi
        text += f" (the interval includes {null:g})" if straddles else " (too few targets to judge)"
    return text


def prose(verdicts: pd.DataFrame) -> str:
    """The verdicts as a markdown paragraph: per claim, its headline rows in words, then the per-bin
    detail counted; and a closing count of verdicts. Every number is read from the rows."""
    missing = [c for c in COLUMNS if c not in verdicts]
    if missing:
        raise KeyError(f"prose: the table lacks the verdict columns {missing}")
    if verdicts.empty:
        return "No verdicts: this run produced no rows to judge."
    lines = []
    for claim, rows in verdicts.groupby("claim", sort=False):
        head, detail = rows[rows["headline"].astype(bool)], rows[~rows["headline"].astype(bool)]
        statistic = "; ".join(dict.fromkeys(head["statistic"])) if len(head) else "; ".join(dict.fromkeys(detail["statistic"]))
        text = f"- **Claim: {claim[0].upper() + claim[1:]}.** Statistic: {statistic}. "
        text += " · ".join(sentence(r) for r in head.to_dict("records"))
        if len(detail):
            counts = detail["verdict"].value_counts()
            text += (f". Per entropy bin ({len(detail)} bins over all groups): "
                     + ", ".join(f"{counts.get(v, 0)} {v}" for v in VERDICTS))
        lines.append(text + ".")
    counts = verdicts.loc[verdicts["headline"].astype(bool), "verdict"].value_counts()
    n_head = int(verdicts["headline"].astype(bool).sum())
    lines.append(f"\nOf {n_head} headline verdicts at {verdicts['level'].iloc[0]:.0%} confidence: "
                 + ", ".join(f"{counts.get(v, 0)} {v}" for v in VERDICTS) + ".")
    return "\n".join(lines)


def show(verdicts: pd.DataFrame, *, detail: bool = True) -> None:
    """Display the verdicts in a notebook: the prose paragraph, then the table (headline rows first;
    `detail=False` hides the per-bin rows)."""
    from IPython.display import Markdown, display

    display(Markdown(prose(verdicts)))
    table = verdicts if detail else verdicts[verdicts["headline"].astype(bool)]
    table = table.sort_values("headline", ascending=False, kind="stable")
    formats = {c: "{:.4g}" for c in ("value", "ci_low", "ci_high", "null")}
    display(table.drop(columns=["level", "direction"]).style.format(formats, na_rep="–").hide(axis="index"))

"""The bottleneck hierarchy (notebook 05): hard ≥ soft ≥ layer-ℓ ≥ norm-constrained ≥ free-h, per target.

`hierarchy` pivots a results table to one row per target and level, `ordering_violations` lists where
the nesting is broken, `hierarchy_parts` splits each target's KL into the steps between levels, and
`with_bound_gap` adds each row's distance to its target's free-h bound.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from .stats import _need, bin_edges, bin_summary


def with_bound_gap(df: pd.DataFrame, *, bound: str = "free_bound", value: str = "kl_nats",
                   keys: Sequence[str] = ("run_id", "sweep", "model", "target_id")) -> pd.DataFrame:
    """The table plus `gap_to_<bound>_nats` = value − the `bound` rows' value for the same target.

    Matching uses those of `keys` the table has (target_id is required): a target's bound row from the
    same run, sweep and model. Where several bound rows match (e.g. one per seed; the bound does not
    depend on the seed) the lowest is used. Rows without a matching bound row get NaN; the bound's own
    rows get ≈ 0. With `improvement_nats`, this is the 'stuck' signal per target: a gap far above
    the bin's and no improvement means the optimiser did not move that target.
    """
    _need(df, ["method", "target_id", value], "with_bound_gap")
    on = [k for k in keys if k in df.columns]
    ref = df[df["method"] == bound].groupby(on, dropna=False)[value].min().rename("_bound_value").reset_index()
    out = df.merge(ref, on=on, how="left")
    out[f"gap_to_{bound}_nats"] = out[value] - out["_bound_value"]
    out.index = df.index
    return out.drop(columns="_bound_value")
# The bottleneck hierarchy, from the output layer alone up to a real-token prompt: each level can
# reach everything the next one can, so for the global optima KL(free) ≤ KL(norm) ≤ KL(layer) ≤
# KL(soft) ≤ KL(hard).
HIERARCHY = ("free_bound", "norm_bound", "layer_bound", "soft", "hard")


def hierarchy(df: pd.DataFrame, levels: Sequence[str] = HIERARCHY, *, column: str = "method",
              value: str = "kl_nats", pair: str = "target_id",
              keep: Sequence[str] = ("kind", "entropy_nats")) -> pd.DataFrame:
    """One row per target: its KL at each level of the hierarchy and the part each level adds.

    `part_<level>` is the level's KL minus the KL of the level below it that the target has (for
    the lowest level, its KL itself: what the output layer alone forces, for free_bound), so the
    parts of a target sum to its KL at its highest level. A level a target lacks (e.g. hard prompts
    run on a subset) is NaN and its part too. Parts can be negative: the optimisers are local, and
    a negative part is an ordering violation (see `ordering_violations`), shown, not hidden.

    Returns: columns pair, *keep, one KL column per level (named by the level), part_<level> per
        level, n_levels.
    """
    levels = list(levels)
    _need(df, [column, value, pair, *keep], "hierarchy")
    present = df[df[column].isin(levels)]
    dup = present.duplicated([pair, column])
    if dup.any():
        raise ValueError(f"hierarchy: several rows for ({pair}, {column}) "
                         f"{present.loc[dup, [pair, column]].head(3).values.tolist()}; filter to one seed / variant")
    wide = present.pivot(index=pair, columns=column, values=value)
    info = df.drop_duplicates(pair).set_index(pair)[list(keep)]
    out = info.loc[wide.index].copy()
    below = np.zeros(len(wide))
    have_below = np.zeros(len(wide), dtype=bool)
    for level in levels:
        kl = wide[level].to_numpy(float) if level in wide else np.full(len(wide), np.nan)
        out[level] = kl
        has = np.isfinite(kl)
        out[f"part_{level}"] = np.where(has, kl - np.where(have_below, below, 0.0), np.nan)
        below = np.where(has, kl, below)
        have_below |= has
    out["n_levels"] = np.isfinite(out[levels].to_numpy(float)).sum(1)
    return out.reset_index()


def ordering_violations(wide: pd.DataFrame, levels: Sequence[str] = HIERARCHY, *,
                        tol: float = 1e-3) -> pd.DataFrame:
    """How often a higher level of the hierarchy beats a lower one by more than `tol` nats.

    Checked for each adjacent pair of levels (lower, upper) over the targets that have both.
    Returns: columns lower, upper, n (targets with both), n_violations (KL_upper < KL_lower − tol),
        frac_violations, max_excess_nats (the largest KL_lower − KL_upper, 0 if none is positive).
    """
    rows = []
    levels = [lv for lv in levels if lv in wide]
    for lower, upper in zip(levels[:-1], levels[1:], strict=True):
        both = wide[[lower, upper]].dropna()
        excess = (both[lower] - both[upper]).to_numpy(float)
        n = len(both)
        bad = int((excess > tol).sum())
        rows.append({"lower": lower, "upper": upper, "n": n, "n_violations": bad,
                     "frac_violations": bad / n if n else float("nan"),
                     "max_excess_nats": float(max(excess.max(), 0.0)) if n else float("nan")})
    return pd.DataFrame(rows, columns=["lower", "upper", "n", "n_violations", "frac_violations",
                                       "max_excess_nats"])


def hierarchy_parts(wide: pd.DataFrame, levels: Sequence[str] = HIERARCHY, *, x: str = "entropy_nats",
                    bins: int | Sequence[float] = 6, by: Sequence[str] = (), n_boot: int = 1000,
                    level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Per bin of `x`, the mean of each level's part (`hierarchy`), with its uncertainty: what a
    stacked-gap figure stacks.

    The parts of a level are averaged over the targets that have the level, so with a level run on
    a subset (hard prompts) its stacked segment is the subset's mean; `top` (the running sum of the
    mean parts) is then an estimate of the level's mean KL over all targets of the bin.
    Returns: columns *by, bin_left, bin_right, bin_mid, level, n, mean, sem, ci_low, ci_high, top.
    """
    by = list(by)
    levels = [lv for lv in levels if f"part_{lv}" in wide]
    long = wide.melt(id_vars=[x, *by], value_vars=[f"part_{lv}" for lv in levels], var_name="level",
                     value_name="part").dropna(subset=["part"])
    long["level"] = long["level"].str.removeprefix("part_")
    edges = bin_edges(wide[x].to_numpy(float), bins)
    summary = bin_summary(long, "part", by=[*by, "level"], x=x, bins=edges, n_boot=n_boot, level=level,
                          seed=seed)
    summary["level"] = pd.Categorical(summary["level"], categories=levels, ordered=True)
    summary = summary.sort_values([*by, "bin_left", "level"]).reset_index(drop=True)
    summary["top"] = summary.groupby([*by, "bin_left"], observed=True)["mean"].cumsum()
    summary["level"] = summary["level"].astype(str)
    cols = [*by, "bin_left", "bin_right", "bin_mid", "level", "n", "mean", "sem", "ci_low", "ci_high", "top"]
    return summary[cols]

"""The study's verdicts, computed from results tables, and the prose that states them.

Each verdict function takes a tidy results table (the one a notebook saves as `tables/results.csv`)
and returns verdict rows with one schema (`COLUMNS`):

    claim      the claim in words, the same for every row of one verdict function
    scope      which part of the table the row judges ("smollm2-135m · soft", "L = 5", "bin 1.8–3.6 nats")
    statistic  what `value` is, with its unit
    value      the statistic on the table; ci_low, ci_high its percentile-bootstrap interval at `level`
    n          the targets (or pairs, or tasks) the statistic is computed from
    null       the value at which the claim would be false ... or not yet shown
    direction  "greater": the claim says value > null; "less": value < null
    verdict    "holds"     the whole interval lies on the claim's side of `null`
               "fails"     the whole interval lies on the other side (the opposite holds)
               "undecided" the interval contains `null`, or a group has fewer than `min_n` rows
                           (default 3: a percentile bootstrap of one row has no spread, and of two rows
                           its interval is just their range, far too narrow to judge by)
    headline   True for the rows a reader needs first (the index shows these); False for detail rows
               (per entropy bin)
    note       the supporting numbers in words, and why a row is undecided

Every interval comes from `analysis.bootstrap_interval`, seeded per group, so the verdicts and the
notebook's own tables agree. Inputs are checked: a missing column, an empty table or a group the
verdict needs that has no rows is an error naming it, never a silent NaN.

`prose(verdicts)` renders the rows as a short markdown paragraph (every number in it comes from the
rows); `show(verdicts)` displays that paragraph and the table in a notebook.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from . import analysis

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


# --------------------------------------------------------------------------------------------
# The verdict of one row.
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Input checks and labels.
# --------------------------------------------------------------------------------------------


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


def _edges_for(values: np.ndarray, bins: int | Sequence[float]) -> np.ndarray:
    """Equal-width edges over [0, max of `values`] for an int, else the given edges."""
    if isinstance(bins, int):
        return analysis.entropy_bins(float(np.max(values)) or 1.0, bins)
    edges = np.asarray(bins, dtype=float)
    if edges.ndim != 1 or len(edges) < 2 or np.any(np.diff(edges) <= 0):
        raise ValueError(f"bins must be an int or increasing edges, got {bins!r}")
    return edges


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


# --------------------------------------------------------------------------------------------
# 1. The entropy hump.
# --------------------------------------------------------------------------------------------


def _hump_ratio(end: np.ndarray, *interior: np.ndarray) -> np.ndarray:
    """max over interior bins of the mean, over the end bin's mean; arrays (n_boot, n_bin).

    Means are clipped at 0: a KL is ≥ 0, and a bound that reaches an end target exactly reports
    ±1e-16 there, whose sign must not decide the verdict (0 at the end gives ∞, 0 / 0 gives NaN)."""
    top = np.max(np.stack([np.maximum(x.mean(1), 0.0) for x in interior]), axis=0)
    bottom = np.maximum(end.mean(1), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(bottom > 0, top / np.where(bottom > 0, bottom, 1.0), np.where(top > 0, np.inf, np.nan))


def entropy_hump(df: pd.DataFrame, *, value: str = "kl_nats", x: str = "entropy_nats",
                 by: Sequence[str] = ("model", "method"), bins: int | Sequence[float] = 6, min_n: int = 3,
                 n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Is the hardest interior entropy bin harder than each end of the range? Per `by` group.

    The range is cut into equal-width bins of `x` (an int: over [0, the group's max x], i.e. 0 … ln|V|
    on a grid that includes the uniform target; or explicit edges). Statistic, for each end:

        ratio = max over interior bins b of mean(value in b) / mean(value in the end bin),

    claimed > 1. The interval is a bootstrap that resamples targets within each bin and takes the
    maximum again in every replicate, so choosing the hardest bin from the same data is accounted
    for. Two rows per group: against the lowest bin and against the highest.

    Args:
        df: one row per target (and method): `value`, `x` and the `by` columns.
    Raises: KeyError for missing columns; ValueError if a group has no rows in its lowest bin, its
        highest bin, or every interior bin (fewer than 3 bins, or a grid that skips the ends).
    """
    who = "entropy_hump"
    df, dropped = _checked(df, [x, *by], value, who)
    rows = []
    for key, part in analysis._groups(df, list(by)):
        xs = part[x].to_numpy(float)
        edges = _edges_for(xs, bins)
        n_bins = len(edges) - 1
        idx = analysis._bin_index(xs, edges)
        values = {b: part[value].to_numpy(float)[idx == b] for b in range(n_bins)}
        interior = [b for b in range(1, n_bins - 1) if len(values[b])]
        empty = [b for b in (0, n_bins - 1) if not len(values[b])]
        if n_bins < 3 or empty or not interior:
            raise ValueError(f"{who}: group {key or 'all'} needs rows in its lowest bin, its highest bin and an "
                             f"interior bin of {n_bins} bins over {edges[0]:.2f}–{edges[-1]:.2f} nats; empty: "
                             f"{[_bin_label(edges[b], edges[b + 1]) for b in empty] or 'every interior bin'}")
        hardest = max(interior, key=lambda b: values[b].mean())
        for end, side, claim in ((0, "low", HUMP_LOW), (n_bins - 1, "high", HUMP_HIGH)):
            used = [end, *interior]
            point = float(_hump_ratio(values[end][None], *(values[b][None] for b in interior))[0])
            lo, hi = analysis.bootstrap_interval(_hump_ratio, [values[b] for b in used], n_boot=n_boot,
                                                 level=level, seed=analysis.group_seed(seed, {**key, "end": side}))
            note = (f"hardest interior {_bin_label(edges[hardest], edges[hardest + 1])}: mean {value} "
                    f"{values[hardest].mean():.4g} (n = {len(values[hardest])}); {side} end "
                    f"{_bin_label(edges[end], edges[end + 1])}: {values[end].mean():.4g} (n = {len(values[end])})")
            rows.append(_row(claim, scope_label(key), f"mean {value} of the hardest interior bin / of the {side} end",
                             point, lo, hi, sum(len(values[b]) for b in used), null=1.0, direction="greater",
                             note=_join(note, _dropped(dropped, value)), level=level, min_n=min_n,
                             enough=all(len(values[b]) >= min_n for b in used)))
    return _frame(rows, who)


# --------------------------------------------------------------------------------------------
# 2. Outliers at matched entropy.
# --------------------------------------------------------------------------------------------


def outliers_easier(df: pd.DataFrame, *, value: str = "kl_nats", column: str = "group", baseline: str = "vanilla",
                    match: str = "requested_entropy_nats", by: Sequence[str] = ("method",),
                    bins: int | Sequence[float] = 6, min_n: int = 3, n_boot: int = 1000, level: float = 0.95,
                    seed: int = 0) -> pd.DataFrame:
    """Are targets with outliers easier than vanilla targets at the same requested entropy?

    Statistic: `analysis.matched_difference`, mean(baseline) − mean(group) over the entropies both
    have (claimed > 0), per bin of `match` (detail rows) and over the whole range (headline rows,
    whose note gives the share of bins where the claim holds). A row is undecided when a stratum (one
    requested entropy) has a single target in either group (a stratified bootstrap of single rows has
    no spread), or a group has fewer than `min_n` targets in all.

    Args:
        df: one row per target × method: `value`, `column` (the group label, e.g.
            `analysis.target_group`), `match` and `by`.
        bins: equal-width bins over [0, max `match`] (an int) or explicit edges.
    Raises: KeyError for missing columns; ValueError without baseline rows or without another group.
    """
    who = "outliers_easier"
    df, dropped = _checked(df, [column, match, *by], value, who)
    _require_values(df, column, [baseline], who)
    if (df[column] == baseline).all():
        raise ValueError(f"{who}: only {column} = {baseline!r} rows; nothing to compare it with")
    edges = _edges_for(df[match].to_numpy(float), bins)
    common = dict(column=column, baseline=baseline, match=match, by=list(by), n_boot=n_boot, level=level, seed=seed)
    per_bin = analysis.matched_difference(df, value, bins=edges, **common)
    overall = analysis.matched_difference(df, value, bins=[0.0, float(df[match].max())], **common)
    if per_bin.empty:
        raise ValueError(f"{who}: no {column} shares a {match} value with {baseline!r}; nothing is matched")
    statistic = f"mean {value}: {baseline} − group, at matched entropy"
    rows, detail = [], {}
    for r in per_bin.to_dict("records"):
        key = {c: r[c] for c in [*by, column]}
        row = _row(OUTLIERS, f"{scope_label(key)} · {_bin_label(r['bin_left'], r['bin_right'])}", statistic,
                   r["diff"], r["ci_low"], r["ci_high"], r["n"], null=0.0, direction="greater",
                   note=f"{r['n_strata']} matched entropies; mean {r['mean']:.4g} vs {baseline} {r['mean_baseline']:.4g}",
                   level=level, min_n=min_n, enough=_strata_enough(r, min_n), headline=False)
        detail.setdefault(scope_label(key), []).append(row)
    for r in overall.to_dict("records"):
        key = {c: r[c] for c in [*by, column]}
        bins_rows = detail.get(scope_label(key), [])
        held = sum(b["verdict"] == "holds" for b in bins_rows)
        note = (f"{r['n_strata']} matched entropies, {r['n_baseline']} {baseline} targets; mean {r['mean']:.4g} vs "
                f"{baseline} {r['mean_baseline']:.4g}; holds in {held} of {len(bins_rows)} entropy bins")
        rows.append(_row(OUTLIERS, scope_label(key), statistic, r["diff"], r["ci_low"], r["ci_high"], r["n"],
                         null=0.0, direction="greater", note=_join(note, _dropped(dropped, value)), level=level,
                         min_n=min_n, enough=_strata_enough(r, min_n)))
        rows += bins_rows
    return _frame(rows, who)


def _strata_enough(r: Mapping, min_n: int) -> bool:
    """Every stratum has ≥ 2 rows in both groups (matched_difference's sem is NaN otherwise) and each
    group ≥ min_n rows in all. With 2 rows per stratum the stratified percentile interval is still
    narrower than it should be (each stratum's resampled variance is (n − 1)/n of the sample's: about
    1/√2 of the width), so prefer ≥ 4 targets per grid point where a verdict matters."""
    return bool(np.isfinite(r["sem"]) and r["n"] >= min_n and r["n_baseline"] >= min_n)


# --------------------------------------------------------------------------------------------
# 3. LM targets against entropy-matched random ones; hard vs soft; proposers (paired verdicts).
# --------------------------------------------------------------------------------------------


def _paired_table(df: pd.DataFrame, value: str, who: str, *, column: str, control: str, treatments, pair: str, by,
                  n_boot: int, level: float, seed: int) -> pd.DataFrame:
    """`analysis.paired_comparison` of the treatments present in df against the control; refuses none present."""
    present = [t for t in treatments if (df[column] == t).any()]
    if not present:
        raise ValueError(f"{who}: no rows with {column} in {list(treatments)}")
    return analysis.paired_comparison(df, value, column=column, control=control, treatments=present, pair=pair,
                                      by=list(by), n_boot=n_boot, level=level, seed=seed)


def lm_targets_easier(df: pd.DataFrame, *, value: str = "kl_nats", column: str = "source", control: str = "random",
                      treatments: Sequence[str] = ("own", "mapped"), pair: str = "pair_id",
                      by: Sequence[str] = ("model", "method"), mass_lost: str | None = "mass_lost",
                      source_model: str | None = "source_model", min_n: int = 3, n_boot: int = 1000,
                      level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Are LM targets easier than their entropy-matched random controls?

    Statistic: `analysis.paired_comparison`'s relative reduction 1 − mean(LM) / mean(control) over
    the pairs (claimed > 0), per `by` group and treatment: "own" is the prompted model's own
    distributions (same tokenizer), "mapped" another model's, moved across tokenizers; the note gives
    the mass the mapping lost (`mass_lost`: mean and max over the group's targets).

    Raises: KeyError for missing columns; ValueError without control rows or without any treatment
        rows, or if no pair is complete.
    """
    who = "lm_targets_easier"
    extra = [c for c in (mass_lost, source_model) if c is not None]
    df, dropped = _checked(df, [column, pair, *by, *extra], value, who, only=(column, [control, *treatments]))
    table = _paired_table(df, value, who, column=column, control=control, treatments=treatments, pair=pair, by=by,
                          n_boot=n_boot, level=level, seed=seed)
    rows = []
    for r in table.to_dict("records"):
        key = {c: r[c] for c in by}
        group = df[(df[column] == r[column])]
        for c, v in key.items():
            group = group[group[c] == v]
        notes = [f"mean {value} {r['mean_treatment']:.4g} vs {r['mean_control']:.4g} for the controls; "
                 f"lower on {r['frac_lower']:.0%} of pairs"]
        label = _source_label(r[column], group[source_model] if source_model is not None else None)
        if mass_lost is not None and group[mass_lost].notna().any():
            lost = group.drop_duplicates(pair)[mass_lost].dropna()
            notes.append(f"mass lost in the mapping: mean {lost.mean():.3g}, max {lost.max():.3g}")
        rows.append(_row(LM_TARGETS, f"{scope_label(key)} · {label}", f"relative reduction of mean {value}",
                         r["relative_reduction"], r["rr_ci_low"], r["rr_ci_high"], r["n"], null=0.0,
                         direction="greater", note=_join(*notes, _dropped(dropped, value)), level=level,
                         min_n=min_n, enough=r["n"] >= min_n))
    return _frame(rows, who)


def _source_label(source: str, source_models: pd.Series | None) -> str:
    """"same model" for the model's own distributions; "<source> from <model>" for another model's."""
    if source == "own":
        return "same model"
    if source_models is not None and source_models.notna().any():
        return f"{source} from {', '.join(map(str, source_models.dropna().unique()))}"
    return str(source)


def hard_vs_soft(df: pd.DataFrame, *, treatment: str = "hard", control: str = "soft", value: str = "kl_nats",
                 column: str = "method", pair: str = "target_id", by: Sequence[str] = ("cfg_prompt_length",),
                 claim: str | None = None, min_n: int = 3, n_boot: int = 1000, level: float = 0.95,
                 seed: int = 0) -> pd.DataFrame:
    """Does the treatment (hard prompts; or the projected soft prompt) end above the soft prompt?

    Statistic: the paired gap mean(treatment − control) in nats over the targets that have both,
    per `by` group (the prompt length L by default), claimed > 0; the note gives both means and the
    share of targets where the treatment is lower.

    Raises: KeyError for missing columns; ValueError without treatment or control rows, or if no
        target has both.
    """
    who = "hard_vs_soft"
    df, dropped = _checked(df, [column, pair, *by], value, who, only=(column, [control, treatment]))
    _require_values(df, column, [treatment], who)
    table = analysis.paired_comparison(df, value, column=column, control=control, treatments=[treatment], pair=pair,
                                       by=list(by), n_boot=n_boot, level=level, seed=seed)
    claim = claim or PAIRED_CLAIMS.get(treatment, f"{treatment} ends above {control}")
    rows = []
    for r in table.to_dict("records"):
        note = (f"mean {value} {r['mean_treatment']:.4g} vs {control} {r['mean_control']:.4g}; {treatment} lower on "
                f"{r['frac_lower']:.0%} of targets")
        rows.append(_row(claim, scope_label({c: r[c] for c in by}), f"mean paired gap {treatment} − {control} ({value})",
                         r["gap"], r["gap_ci_low"], r["gap_ci_high"], r["n"], null=0.0, direction="greater",
                         note=_join(note, _dropped(dropped, value)), level=level, min_n=min_n,
                         enough=r["n"] >= min_n))
    return _frame(rows, who)


def proposers_beat_instructions(df: pd.DataFrame, *, value: str = "kl_answers_nats", column: str = "method",
                                control: str = "instruction", treatments: Sequence[str] = ("hard", "soft"),
                                pair: str = "task", by: Sequence[str] = ("model",), min_n: int = 3,
                                n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Does an optimised prompt induce an answer distribution closer to the target than the best
    hand-written instruction? Paired over tasks.

    Statistic: the mean over tasks of (method − instruction) in `value` (the KL over whole answers,
    nats), claimed < 0; the interval resamples tasks. With few tasks (5 by default) the interval is
    rough: rows with fewer than `min_n` tasks are undecided.

    Raises: KeyError for missing columns; ValueError without instruction rows or treatment rows.
    """
    who = "proposers_beat_instructions"
    df, dropped = _checked(df, [column, pair, *by], value, who, only=(column, [control, *treatments]))
    table = _paired_table(df, value, who, column=column, control=control, treatments=treatments, pair=pair, by=by,
                          n_boot=n_boot, level=level, seed=seed)
    rows = []
    for r in table.to_dict("records"):
        note = (f"mean {value} {r['mean_treatment']:.4g} vs the best instruction's {r['mean_control']:.4g} "
                f"(relative reduction {r['relative_reduction']:.0%}); lower on {r['frac_lower']:.0%} of tasks")
        rows.append(_row(PROPOSERS, scope_label({**{c: r[c] for c in by}, column: r[column]}),
                         f"mean gap {r[column]} − {control} over tasks ({value})", r["gap"], r["gap_ci_low"],
                         r["gap_ci_high"], r["n"], null=0.0, direction="less",
                         note=_join(note, _dropped(dropped, value)), level=level, min_n=min_n,
                         enough=r["n"] >= min_n))
    return _frame(rows, who)


# --------------------------------------------------------------------------------------------
# 4. The bottleneck's share of the soft prompt's KL.
# --------------------------------------------------------------------------------------------


def bound_share(df: pd.DataFrame, *, numerator: str = "free_bound", denominator: str = "soft",
                value: str = "kl_nats", column: str = "method", pair: str = "target_id",
                x: str = "entropy_nats", by: Sequence[str] = ("model",), bins: int | Sequence[float] = 6,
                threshold: float = 0.5, min_n: int = 3, n_boot: int = 1000, level: float = 0.95,
                seed: int = 0) -> pd.DataFrame:
    """The share of the soft prompt's KL that the output layer alone forces, per entropy bin and overall.

    Statistic: mean(free-h bound KL) / mean(soft KL) over the targets that have both
    (`analysis.ratio_of_means`), per bin of `x` (detail rows) and over all targets (a headline row
    per `by` group); claimed > `threshold` (most of the KL is the bottleneck's).

    Args:
        df: the long results table (one row per target × method): `value`, `column`, `pair`, `x`, `by`.
        bins: an int (equal-width over [0, the group's max x]) or explicit edges.
    Raises: KeyError for missing columns; ValueError without numerator or denominator rows, or if no
        target has both.
    """
    who = "bound_share"
    df, dropped = _checked(df, [column, pair, x, *by], value, who, only=(column, [numerator, denominator]))
    _require_values(df, column, [denominator], who)
    statistic = f"mean {numerator} {value} / mean {denominator} {value}"
    claim = BOUND_SHARE if threshold == 0.5 else f"the output layer alone forces more than {threshold:.0%} of the soft prompt's KL"
    rows = []
    for key, part in analysis._groups(df, list(by)):
        wide = analysis.hierarchy(part, levels=(numerator, denominator), column=column, value=value, pair=pair,
                                  keep=(x,)).dropna(subset=[numerator, denominator])
        if wide.empty:
            continue
        common = dict(x=x, n_boot=n_boot, level=level, seed=analysis.group_seed(seed, key))
        overall = analysis.ratio_of_means(wide, numerator, denominator, bins=None, **common)
        per_bin = analysis.ratio_of_means(wide, numerator, denominator, bins=_edges_for(wide[x].to_numpy(float), bins),
                                          **common)
        detail = [_row(claim, f"{scope_label(key)} · {_bin_label(r['bin_left'], r['bin_right'])}", statistic,
                       r["ratio"], r["ci_low"], r["ci_high"], r["n"], null=threshold, direction="greater",
                       note=f"mean {numerator} {r['mean_numerator']:.4g}, {denominator} {r['mean_denominator']:.4g}",
                       level=level, min_n=min_n, enough=r["n"] >= min_n, headline=False)
                  for r in per_bin.to_dict("records")]
        (r,) = overall.to_dict("records")
        held = sum(d["verdict"] == "holds" for d in detail)
        note = (f"mean {numerator} {r['mean_numerator']:.4g}, {denominator} {r['mean_denominator']:.4g}; "
                f"share per bin from {per_bin['ratio'].min():.0%} to {per_bin['ratio'].max():.0%}; holds in {held} of "
                f"{len(detail)} entropy bins")
        rows.append(_row(claim, scope_label(key), statistic, r["ratio"], r["ci_low"], r["ci_high"], r["n"],
                         null=threshold, direction="greater", note=_join(note, _dropped(dropped, value)), level=level,
                         min_n=min_n, enough=r["n"] >= min_n))
        rows += detail
    return _frame(rows, who)


# --------------------------------------------------------------------------------------------
# Rendering.
# --------------------------------------------------------------------------------------------


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

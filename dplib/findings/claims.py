"""The verdict functions, one per claim of the study: each takes a results table and returns verdict
rows (`rows.COLUMNS`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from .. import analysis
from .rows import (
    BOUND_SHARE,
    HUMP_HIGH,
    HUMP_LOW,
    LM_TARGETS,
    OUTLIERS,
    PAIRED_CLAIMS,
    PROPOSERS,
    _bin_label,
    _checked,
    _dropped,
    _frame,
    _join,
    _require_values,
    _row,
    scope_label,
)


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
    for key, part in analysis.grouped(df, list(by)):
        xs = part[x].to_numpy(float)
        edges = analysis.bin_edges(xs, bins)
        n_bins = len(edges) - 1
        idx = analysis.bin_index(xs, edges)
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
    edges = analysis.bin_edges(df[match].to_numpy(float), bins)
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
    for key, part in analysis.grouped(df, list(by)):
        wide = analysis.hierarchy(part, levels=(numerator, denominator), column=column, value=value, pair=pair,
                                  keep=(x,)).dropna(subset=[numerator, denominator])
        if wide.empty:
            continue
        common = dict(x=x, n_boot=n_boot, level=level, seed=analysis.group_seed(seed, key))
        overall = analysis.ratio_of_means(wide, numerator, denominator, bins=None, **common)
        per_bin = analysis.ratio_of_means(wide, numerator, denominator, bins=analysis.bin_edges(wide[x].to_numpy(float), bins),
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

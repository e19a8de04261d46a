"""Statistics on tidy tables: entropy bins, seeded percentile-bootstrap intervals, per-bin and per-group
summaries, matched and paired comparisons, ratios of means.

Every interval here is a percentile bootstrap computed by one helper, `bootstrap_interval`, seeded per
group with `group_seed(seed, key)` (a hash of the base seed and the group's key): a group's interval
depends on its own rows only, so adding or removing another group (a model, a bin, a method) never
moves it, and the same table always gives the same intervals.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from ..seeds import derive_seed


def entropy_bins(max_entropy: float, n_bins: int) -> np.ndarray:
    """`n_bins + 1` equal-width bin edges over [0, max_entropy] (nats)."""
    if n_bins < 1 or not max_entropy > 0:
        raise ValueError(f"need n_bins ≥ 1 and max_entropy > 0; got {n_bins}, {max_entropy}")
    return np.linspace(0.0, float(max_entropy), n_bins + 1)


def group_seed(seed: int, key: Mapping | Sequence = ()) -> int:
    """The bootstrap seed of one group: a pure function of the base `seed` and the group's key
    ({column: value} or a sequence of values), so no group's interval depends on which others exist."""
    items = sorted(key.items(), key=lambda kv: str(kv[0])) if isinstance(key, Mapping) else list(enumerate(key))
    return derive_seed(seed, "bootstrap", *(f"{k}={v}" for k, v in items))


def _percentiles(samples: np.ndarray, level: float) -> tuple[float, float]:
    """The central `level` percentile interval of bootstrap replicates (NaN replicates dropped; with
    infinite replicates, e.g. a ratio over a resample whose denominator is 0, no interpolation)."""
    samples = np.asarray(samples, dtype=float)
    samples = samples[~np.isnan(samples)]
    if len(samples) == 0:
        return float("nan"), float("nan")
    alpha = (1 - level) / 2
    method = "linear" if np.isfinite(samples).all() else "inverted_cdf"
    lo, hi = np.quantile(samples, [alpha, 1 - alpha], method=method)
    return float(lo), float(hi)


def bootstrap_interval(statistic: Callable[..., np.ndarray], samples: Sequence[np.ndarray], *,
                       n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of `statistic`, resampling each sample independently (stratified).

    Args:
        statistic: called as statistic(*resampled), where resampled[i] has shape (n_boot, n_i, ...)
            (rows of samples[i] drawn with replacement); returns the (n_boot,) replicate values.
            A paired sample is one (n, 2) array, so its pairs are resampled together.
        samples: arrays of shape (n_i, ...): one observation per row.
        seed: an int; give each group its own with `group_seed(seed, key)`.
    Returns: (lo, hi), the central `level` interval of the replicates; (nan, nan) when a sample is
        empty. A sample of one row has nothing to resample: with every sample of one row the interval
        is the point value (lo = hi), which says nothing about uncertainty (callers judging a claim
        must require n ≥ 2 themselves).
    """
    samples = [np.asarray(x, dtype=float) for x in samples]
    if not samples or any(len(x) == 0 for x in samples):
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    resampled = [x[rng.integers(0, len(x), size=(n_boot, len(x)))] for x in samples]
    with np.errstate(divide="ignore", invalid="ignore"):
        replicates = np.asarray(statistic(*resampled), dtype=float)
    if replicates.shape != (n_boot,):
        raise ValueError(f"bootstrap_interval: the statistic returned shape {replicates.shape}, expected "
                         f"({n_boot},): reduce over the observation axis (axis 1) only")
    return _percentiles(replicates, level)


def _mean_of_rows(x: np.ndarray) -> np.ndarray:
    return x.mean(axis=1)


def bootstrap_ci(values: np.ndarray, *, n_boot: int = 1000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the mean (non-finite values dropped); (nan, nan)
    for an empty sample, (v, v) for a single value."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    return bootstrap_interval(_mean_of_rows, [values], n_boot=n_boot, level=level, seed=seed)


def bin_summary(df: pd.DataFrame, value: str = "kl_nats", *, by: Sequence[str] = ("method",),
                x: str = "entropy_nats", bins: int | Sequence[float] = 8, range_by: Sequence[str] = (),
                n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Mean of `value` per group and per bin of `x`, with standard error and bootstrap CI.

    Args:
        df: a tidy table with columns `x`, `value` and `by`.
        bins: the number of equal-width bins over [0, max x] or explicit edges.
        range_by: with an int `bins`, columns of `by` within which the range [0, max x] is taken
            (e.g. ["model"]: each model's bins span its own entropy range, 0 … ln|V| on its grid).
    Returns: columns *by, bin_left, bin_right, bin_mid, n, mean, sem, ci_low, ci_high, where
        sem = sample std / sqrt(n) (NaN for n = 1) and the CI is a `level` percentile bootstrap of
        the mean, seeded per group (the same rows give the same interval).
    """
    by, range_by = list(by), list(range_by)
    _need(df, [x, value, *by], "bin_summary")
    if range_by and not set(range_by) <= set(by):
        raise ValueError(f"bin_summary: range_by {range_by} must be columns of by {by}")
    if range_by and isinstance(bins, int):
        parts = [bin_summary(part, value, by=by, x=x, bins=entropy_bins(float(part[x].max()) or 1.0, bins),
                             n_boot=n_boot, level=level, seed=seed) for _, part in grouped(df, range_by)]
        return pd.concat(parts, ignore_index=True)
    edges = entropy_bins(float(df[x].max()) or 1.0, bins) if isinstance(bins, int) else np.asarray(bins, float)
    work = df.assign(_bin=bin_index(df[x].to_numpy(float), edges))
    rows = []
    for key, group in grouped(work, [*by, "_bin"]):
        vals = group[value].to_numpy(dtype=float)
        b = int(key.pop("_bin"))
        lo, hi = bootstrap_ci(vals, n_boot=n_boot, level=level, seed=group_seed(seed, {**key, "bin": b}))
        n = int(np.isfinite(vals).sum())
        rows.append({**key, "bin_left": edges[b], "bin_right": edges[b + 1],
                     "bin_mid": (edges[b] + edges[b + 1]) / 2, "n": n,
                     "mean": float(np.nanmean(vals)) if n else float("nan"),
                     "sem": float(np.nanstd(vals, ddof=1) / np.sqrt(n)) if n > 1 else float("nan"),
                     "ci_low": lo, "ci_high": hi})
    return pd.DataFrame(rows, columns=[*by, "bin_left", "bin_right", "bin_mid", "n", "mean", "sem",
                                       "ci_low", "ci_high"])


def pivot_bins(summary: pd.DataFrame, column: str = "method", value: str = "mean") -> pd.DataFrame:
    """A bin_summary table as one row per bin and one column per `column` value (for printing)."""
    table = summary.pivot_table(index=["bin_left", "bin_right"], columns=column, values=value)
    table.columns.name = None
    return table.reset_index()


def bin_index(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """(n,) values → (n,) the index of each one's bin (right edge of the last bin closed, out-of-range values clipped)."""
    return np.clip(np.searchsorted(edges, values, side="right") - 1, 0, len(edges) - 2)


def bin_edges(values, bins: int | Sequence[float]) -> np.ndarray:
    """The bin edges for `bins`: an int → that many equal-width bins over [0, max of `values`] (the
    finite ones; [0, 1] when there are none or the max is 0); a sequence → those edges, checked to
    increase."""
    if isinstance(bins, int):
        finite = np.asarray(values, dtype=float)
        finite = finite[np.isfinite(finite)]
        return entropy_bins((float(finite.max()) if len(finite) else 0.0) or 1.0, bins)
    edges = np.asarray(bins, dtype=float)
    if edges.ndim != 1 or len(edges) < 2 or np.any(np.diff(edges) <= 0):
        raise ValueError(f"bins must be an int or increasing edges, got {bins!r}")
    return edges


def grouped(df: pd.DataFrame, by: Sequence[str]):
    """(key dict, rows) per combination of `by` (one group of everything when `by` is empty)."""
    if not by:
        yield {}, df
        return
    for key, rows in df.groupby(list(by), sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        yield dict(zip(by, key, strict=True)), rows


def _need(df: pd.DataFrame, columns, who: str) -> None:
    missing = [c for c in columns if c not in df]
    if missing:
        raise KeyError(f"{who}: columns {missing} not in the table (have {list(df.columns)})")


def _stratified_difference(*resampled: np.ndarray) -> np.ndarray:
    """(1/S) Σ_s (mean baseline_s − mean group_s) over S strata given as (baseline_1, group_1, ...)."""
    pairs = zip(resampled[0::2], resampled[1::2], strict=True)
    return sum(b.mean(1) - g.mean(1) for b, g in pairs) / (len(resampled) // 2)


def matched_difference(df: pd.DataFrame, value: str = "kl_nats", *, column: str, baseline: str,
                       match: str = "requested_entropy_nats", by: Sequence[str] = (),
                       bins: int | Sequence[float] = 8, n_boot: int = 1000, level: float = 0.95,
                       seed: int = 0) -> pd.DataFrame:
    """Baseline minus each other group of `column`, per bin of `match`, at exactly matched `match` values.

    Designed for targets built on one grid of requested entropies: the baseline (e.g. vanilla) at
    every grid point, another group (e.g. outliers with k, m) only where it is feasible. Within a
    bin, only the strata (distinct `match` values) where both the group and the baseline have rows
    count, so the comparison is never confounded by the baseline covering entropies the group
    does not. With S such strata in a bin:

        mean_group = (1/S) Σ_s mean(group rows of s),  mean_baseline likewise,
        diff = mean_baseline − mean_group,
        sem = sqrt(Σ_s (var_b,s / n_b,s + var_g,s / n_g,s)) / S   (NaN if a stratum has one row),

    and the CI is a stratified percentile bootstrap: within each stratum both groups are resampled
    independently (seeded: the same table gives the same interval).

    Args:
        df: tidy rows with `value`, `column`, `match` and `by` columns.
        column: the group column (e.g. "group"); `baseline` is one of its values.
        bins: the number of equal-width bins over [0, max `match`], or explicit edges.
    Returns: columns *by, column, bin_left, bin_right, bin_mid, n_strata, n, n_baseline, mean,
        mean_baseline, diff, sem, ci_low, ci_high — one row per (by, group, bin) with ≥ 1 stratum.
    """
    by = list(by)
    _need(df, [value, column, match, *by], "matched_difference")
    edges = bin_edges(df[match].to_numpy(float), bins)
    rows = []
    for key, part in grouped(df, by):
        base = part[part[column] == baseline]
        base_strata = {s: r[value].to_numpy(float) for s, r in base.groupby(match)}
        for group, grows in part[part[column] != baseline].groupby(column, sort=False):
            strata = [(s, r[value].to_numpy(float)) for s, r in grows.groupby(match) if s in base_strata]
            bin_of = {s: int(bin_index(np.array([s]), edges)[0]) for s, _ in strata}
            for b in sorted(set(bin_of.values())):
                cells = [(base_strata[s], g) for s, g in strata if bin_of[s] == b]
                n_s = len(cells)
                mean_b = float(np.mean([c[0].mean() for c in cells]))
                mean_g = float(np.mean([c[1].mean() for c in cells]))
                if all(len(c[0]) > 1 and len(c[1]) > 1 for c in cells):
                    var = sum(c[0].var(ddof=1) / len(c[0]) + c[1].var(ddof=1) / len(c[1]) for c in cells)
                    sem = float(np.sqrt(var) / n_s)
                else:
                    sem = float("nan")
                lo, hi = bootstrap_interval(_stratified_difference, [v for c in cells for v in c], n_boot=n_boot,
                                            level=level, seed=group_seed(seed, {**key, column: group, "bin": b}))
                rows.append({**key, column: group, "bin_left": edges[b], "bin_right": edges[b + 1],
                             "bin_mid": (edges[b] + edges[b + 1]) / 2, "n_strata": n_s,
                             "n": sum(len(c[1]) for c in cells), "n_baseline": sum(len(c[0]) for c in cells),
                             "mean": mean_g, "mean_baseline": mean_b, "diff": mean_b - mean_g,
                             "sem": sem, "ci_low": lo, "ci_high": hi})
    return pd.DataFrame(rows, columns=[*by, column, "bin_left", "bin_right", "bin_mid", "n_strata", "n",
                                       "n_baseline", "mean", "mean_baseline", "diff", "sem", "ci_low",
                                       "ci_high"])


def _mean_gap(pairs: np.ndarray) -> np.ndarray:
    """mean(t − c) of resampled (treatment, control) pairs, shape (n_boot, n, 2) → (n_boot,)."""
    return (pairs[..., 0] - pairs[..., 1]).mean(1)


def _relative_reduction(pairs: np.ndarray) -> np.ndarray:
    """1 − mean(t) / mean(c) of resampled (treatment, control) pairs (a ratio of means)."""
    return 1.0 - pairs[..., 0].mean(1) / pairs[..., 1].mean(1)


def paired_comparison(df: pd.DataFrame, value: str = "kl_nats", *, column: str, control: str,
                      treatments: Sequence[str] | str | None = None, pair: str = "target_id",
                      by: Sequence[str] = (), n_boot: int = 1000, level: float = 0.95,
                      seed: int = 0) -> pd.DataFrame:
    """Each treatment against the control on paired rows: the mean gap and the relative reduction.

    Rows of a treatment and of the control are paired by the `pair` column (the same target under
    two methods: pair="target_id"; a target and its entropy-matched control: a shared pair id) within
    each `by` group; only complete pairs count. For the n pairs (t_i, c_i):

        gap = mean(t − c)  (negative: the treatment reaches a lower value),
        relative_reduction = 1 − mean(t) / mean(c)  (a ratio of means, not a mean of ratios: a mean
            of per-pair ratios is dominated by pairs whose control is near 0),
        frac_lower = the fraction of pairs with t < c,

    with sem of the gap (std / √n) and percentile-bootstrap CIs of gap and relative reduction,
    resampling pairs (one set of resamples for both; seeded).

    Args:
        column: the column naming treatments and control (e.g. "method", "source").
        treatments: the values compared with `control` (default: every other value, in order).
    Returns: columns *by, column (the treatment), control, n, mean_treatment, mean_control, gap,
        gap_sem, gap_ci_low, gap_ci_high, relative_reduction, rr_ci_low, rr_ci_high, frac_lower.
    Raises ValueError if a `pair` value repeats within a (by, column) group.
    """
    by = list(by)
    _need(df, [value, column, pair, *by], "paired_comparison")
    if isinstance(treatments, str):
        treatments = [treatments]
    if treatments is None:
        treatments = [t for t in dict.fromkeys(df[column]) if t != control]
    rows = []
    for key, part in grouped(df, by):
        for name in [control, *treatments]:
            dup = part.loc[part[column] == name, pair].duplicated()
            if dup.any():
                raise ValueError(f"paired_comparison: {pair} values repeat within {column}={name!r} "
                                 f"{key or ''}: {part.loc[part[column] == name, pair][dup].tolist()[:3]}; "
                                 "add the distinguishing column to `by`")
        ctrl = part.loc[part[column] == control, [pair, value]]
        for name in treatments:
            both = part.loc[part[column] == name, [pair, value]].merge(ctrl, on=pair, suffixes=("_t", "_c"))
            t, c = both[f"{value}_t"].to_numpy(float), both[f"{value}_c"].to_numpy(float)
            n = len(both)
            if n == 0:
                continue
            pairs = np.column_stack([t, c])
            seed_of = group_seed(seed, {**key, column: name, "control": control})
            with np.errstate(divide="ignore", invalid="ignore"):
                rr = 1.0 - t.mean() / c.mean() if c.mean() != 0 else float("nan")
            glo, ghi = bootstrap_interval(_mean_gap, [pairs], n_boot=n_boot, level=level, seed=seed_of)
            rlo, rhi = bootstrap_interval(_relative_reduction, [pairs], n_boot=n_boot, level=level, seed=seed_of)
            rows.append({**key, column: name, "control": control, "n": n, "mean_treatment": float(t.mean()),
                         "mean_control": float(c.mean()), "gap": float((t - c).mean()),
                         "gap_sem": float((t - c).std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan"),
                         "gap_ci_low": glo, "gap_ci_high": ghi, "relative_reduction": float(rr),
                         "rr_ci_low": rlo, "rr_ci_high": rhi, "frac_lower": float((t < c).mean())})
    return pd.DataFrame(rows, columns=[*by, column, "control", "n", "mean_treatment", "mean_control", "gap",
                                       "gap_sem", "gap_ci_low", "gap_ci_high", "relative_reduction",
                                       "rr_ci_low", "rr_ci_high", "frac_lower"])


def group_summary(df: pd.DataFrame, value: str = "kl_nats", *, by: Sequence[str] = ("method",),
                  n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """n, mean, sem and bootstrap CI of `value` per `by` group (NaN group keys kept).

    Returns: columns *by, n, mean, sem, ci_low, ci_high; groups in sorted order.
    """
    by = list(by)
    _need(df, [value, *by], "group_summary")
    rows = []
    for key, part in grouped(df, by):
        vals = part[value].to_numpy(float)
        vals = vals[np.isfinite(vals)]
        lo, hi = bootstrap_ci(vals, n_boot=n_boot, level=level, seed=group_seed(seed, key))
        rows.append({**key, "n": len(vals), "mean": float(vals.mean()) if len(vals) else float("nan"),
                     "sem": float(vals.std(ddof=1) / np.sqrt(len(vals))) if len(vals) > 1 else float("nan"),
                     "ci_low": lo, "ci_high": hi})
    return pd.DataFrame(rows, columns=[*by, "n", "mean", "sem", "ci_low", "ci_high"])


def _ratio_of_means(pairs: np.ndarray) -> np.ndarray:
    """mean(numerator) / mean(denominator) of resampled (numerator, denominator) rows."""
    return pairs[..., 0].mean(1) / pairs[..., 1].mean(1)


def ratio_of_means(df: pd.DataFrame, numerator: str, denominator: str, *, x: str = "entropy_nats",
                   bins: int | Sequence[float] | None = 6, by: Sequence[str] = (), n_boot: int = 1000,
                   level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """mean(numerator) / mean(denominator) over the rows having both, per bin of `x` (and `by`).

    E.g. on a `hierarchy` table, numerator="free_bound", denominator="soft": the share of the soft
    prompt's KL that the output layer alone already forces. CI: percentile bootstrap over rows.
    `bins=None` gives one row per `by` group over all `x`.
    Returns: columns *by, bin_left, bin_right, bin_mid, n, mean_numerator, mean_denominator, ratio,
        ci_low, ci_high.
    """
    by = list(by)
    _need(df, [numerator, denominator, x, *by], "ratio_of_means")
    both = df.dropna(subset=[numerator, denominator])
    values = both[x].to_numpy(float)
    edges = (np.array([np.nanmin(values), np.nanmax(values)]) if bins is None and len(values)
             else bin_edges(values, bins if bins is not None else 1))
    rows = []
    for key, part in grouped(both.assign(_bin=bin_index(both[x].to_numpy(float), edges)), [*by, "_bin"]):
        b = int(key.pop("_bin"))
        num, den = part[numerator].to_numpy(float), part[denominator].to_numpy(float)
        n = len(part)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = num.mean() / den.mean() if den.mean() != 0 else float("nan")
        lo, hi = bootstrap_interval(_ratio_of_means, [np.column_stack([num, den])], n_boot=n_boot, level=level,
                                    seed=group_seed(seed, {**key, "bin": b}))
        rows.append({**key, "bin_left": edges[b], "bin_right": edges[b + 1], "bin_mid": (edges[b] + edges[b + 1]) / 2,
                     "n": n, "mean_numerator": float(num.mean()), "mean_denominator": float(den.mean()),
                     "ratio": float(ratio), "ci_low": lo, "ci_high": hi})
    return pd.DataFrame(rows, columns=[*by, "bin_left", "bin_right", "bin_mid", "n", "mean_numerator",
                                       "mean_denominator", "ratio", "ci_low", "ci_high"])

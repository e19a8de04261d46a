"""Figures from tidy tables: a DataFrame in, a matplotlib Figure out. Never imports torch.

Every function takes the long-form tables the runner and `dplib.analysis` produce (one row per
target × method × seed, or per token), draws with seaborn, and returns the Figure; saving is the
caller's (`Run.save_figure`). Nothing here computes a metric: summaries come from `analysis`.

Each method has one colour in every figure (`METHOD_COLORS`, through `palette`), so soft is the
same blue in the quickstart, the sweeps and the playground. `readable` formats a table for reading
(fixed decimals, never scientific notation for probabilities).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from . import analysis

BOUND_STYLE = {"color": "black", "linestyle": "--", "linewidth": 1.6}

# One colour per method in every figure; "target" is the target's own bars in `distributions`.
# Bounds are dark (free_bound black, like the dashed bound lines), prompts bright.
METHOD_COLORS = {
    "target": "#a6a6a6",
    "soft": "#1f77b4",
    "hard": "#ff7f0e",
    "instruction": "#2ca02c",
    "free_bound": "#111111",
    "norm_bound": "#8c564b",
    "layer_bound": "#9467bd",
}
# Names that are not methods (groups, sources, variants) take these, in order of first appearance.
OTHER_COLORS = ["#17becf", "#e377c2", "#bcbd22", "#d62728", "#7f7f7f", "#aec7e8", "#ffbb78", "#98df8a",
                "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5"]


def palette(names) -> dict:
    """{name: colour} for the names in order: a method's own colour from `METHOD_COLORS`, and for
    any other name the next unused colour of `OTHER_COLORS` (cycled if there are more names)."""
    names = list(dict.fromkeys(names))  # keys keep their type: seaborn looks hue values up as they are
    others = iter(OTHER_COLORS * (1 + len(names) // len(OTHER_COLORS)))
    return {n: METHOD_COLORS.get(str(n)) or next(others) for n in names}


# Columns `readable` shows with 4 fixed decimals (nats, probabilities, fractions) or 1 (seconds).
_FOUR_DECIMALS = ("_nats", "prob", "tv", "recall", "agree", "mass", "lr")
_ONE_DECIMAL = ("_s",)


def readable(df: pd.DataFrame, *, decimals: int = 4):
    """A pandas Styler of `df` for display: KL, entropies, probabilities and fractions with
    `decimals` fixed decimals (0.0001, never 1e-04), seconds with one, integers as integers; the
    numbers themselves are unchanged (`.data` is `df`)."""
    formats = {}
    for col in df.columns:
        if not pd.api.types.is_float_dtype(df[col]):
            continue
        name = str(col)
        if name.endswith(_ONE_DECIMAL) and not name.endswith(_FOUR_DECIMALS):
            formats[col] = "{:.1f}"
        else:
            formats[col] = f"{{:.{decimals}f}}"
    return df.style.format(formats, na_rep="–").hide(axis="index")


def target_title(row, kl: Mapping[str, float] | None = None) -> str:
    """A panel title a reader can parse: the target's kind (with k and m for outliers), its entropy,
    and the KL each method reached, e.g. "vanilla target, H = 3.00 nats\nKL (nats): soft 0.1234 ·
    free_bound 0.0100". `row` maps column names (kind, k, mass, entropy_nats) to values."""
    kind = str(row.get("kind", "") or "")
    extra = ""
    if kind == "outlier" and pd.notna(row.get("k")) and pd.notna(row.get("mass")):
        extra = f" (k = {int(row['k'])}, m = {float(row['mass']):.2f})"
    head = f"{kind + ' ' if kind else ''}target{extra}"
    if pd.notna(row.get("entropy_nats", np.nan)):
        head += f", H = {float(row['entropy_nats']):.2f} nats"
    if kl:
        head += "\nKL (nats): " + " · ".join(f"{name} {value:.4f}" for name, value in kl.items())
    return head


def _is_bound(df: pd.DataFrame) -> pd.Series:
    # the table's is_bound column (cells.is_bound_method wrote it) is the one rule; no column, no bounds
    if "is_bound" in df:
        return df["is_bound"].fillna(False).astype(bool)
    return pd.Series(False, index=df.index)


def _bin_means(df: pd.DataFrame, x: str, y: str, edges: np.ndarray) -> pd.DataFrame:
    idx = analysis.bin_index(df[x].to_numpy(float), edges)
    mids = (edges[:-1] + edges[1:]) / 2
    out = df.assign(_mid=mids[idx]).groupby("_mid", as_index=False)[y].mean()
    return out.rename(columns={"_mid": x})


def kl_vs_entropy(df: pd.DataFrame, *, x: str = "entropy_nats", y: str = "kl_nats",
                  hue: str = "method", bins: int = 10, max_entropy: float | None = None,
                  log_y: bool = False, title: str | None = None, ax=None):
    """KL against target entropy: per-target points and per-bin mean lines per method; bounds as lines.

    Rows that are bounds (`is_bound` true; a table without that column has none) are drawn
    as a black dashed line through their per-bin means (one line per bound method) with faint
    points; the other methods as coloured points with a line through their per-bin means.
    `max_entropy` (e.g. ln |V|) draws a dotted vertical line at the largest possible entropy.
    """
    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 4.5))
    fig = ax.figure
    if df.empty:
        ax.text(0.5, 0.5, "no rows", ha="center", va="center", transform=ax.transAxes)
        return fig
    top = max_entropy if max_entropy is not None else float(df[x].max())
    edges = analysis.entropy_bins(max(top, 1e-9), bins)
    bound = _is_bound(df)
    prompts, bounds = df[~bound], df[bound]
    if not prompts.empty:
        order = list(dict.fromkeys(prompts[hue]))
        colors = palette(order)
        for name in order:
            rows = prompts[prompts[hue] == name]
            ax.scatter(rows[x], rows[y], s=18, alpha=0.45, color=colors[name])
            means = _bin_means(rows, x, y, edges)
            ax.plot(means[x], means[y], marker="o", color=colors[name], label=f"{name} (bin mean)")
    styles = ["--", ":", "-."]
    bound_colors = palette(bounds[hue])
    for i, (name, rows) in enumerate(bounds.groupby(hue, sort=False)):
        color = bound_colors[name]
        ax.scatter(rows[x], rows[y], s=8, color=color, alpha=0.25)
        means = _bin_means(rows, x, y, edges)
        ax.plot(means[x], means[y], **{**BOUND_STYLE, "color": color, "linestyle": styles[i % 3]},
                label=f"{name} (bound)")
    if max_entropy is not None:
        ax.axvline(max_entropy, color="grey", linestyle=":", linewidth=1)
    if log_y:
        ax.set_yscale("symlog", linthresh=1e-2)
    return _finish(ax, "target entropy (nats)", "KL(target ‖ model) (nats)", title or "KL vs target entropy")


def _finish(ax, xlabel: str, ylabel: str, title: str):
    """Label one line plot, add its legend, despine, tighten; returns its figure."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(frameon=False, fontsize=8)
    sns.despine(ax=ax)
    ax.figure.tight_layout()
    return ax.figure


def binned_kl(summary: pd.DataFrame, *, hue: str = "method", title: str | None = None, ax=None):
    """A `analysis.bin_summary` table drawn as mean lines with their CI band, one per `hue` value."""
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4.5))
    colors = palette(summary[hue])
    for name, rows in summary.groupby(hue, sort=False):
        color = colors[name]
        rows = rows.sort_values("bin_mid")
        ax.plot(rows["bin_mid"], rows["mean"], marker="o", color=color, label=name)
        ax.fill_between(rows["bin_mid"], rows["ci_low"], rows["ci_high"], color=color, alpha=0.2)
    return _finish(ax, "target entropy bin centre (nats)", "mean KL (nats)",
                   title or "mean KL per entropy bin (95% bootstrap CI)")


LOG_AUTO_RATIO = 100.0  # log_y="auto": a log axis once the plotted probabilities span more than this factor
LOG_FLOOR = 1e-8  # the lowest probability a log axis shows; smaller ones are drawn at the floor


def distributions(top: pd.DataFrame, *, target_ids: Sequence[str] | None = None, col_wrap: int = 2,
                  log_y: bool | str = False, title: str | None = None, table: pd.DataFrame | None = None):
    """Target vs achieved probabilities of each target's top tokens, tokens labelled on the x axis.

    `top` is `analysis.top_tokens(...)`: one row per (target_id, token, source). One panel per
    target; bars grouped by token (ordered by target rank), coloured by source (one colour per
    method, `palette`). `log_y`: True for a log probability axis (floored at `LOG_FLOOR`), "auto" for
    one where a panel's positive probabilities span more than `LOG_AUTO_RATIO` (a prompt's small
    probabilities are invisible on a linear axis). `table`: the results table (`runner.results_table`:
    target_id, method or variant, kl_nats, kind, entropy_nats): each panel is then titled with the
    target's kind, entropy and every method's KL (`target_title`); without it, with the target id.
    """
    ids = list(target_ids) if target_ids is not None else list(dict.fromkeys(top["target_id"]))
    n = len(ids)
    ncols = min(col_wrap, max(n, 1))
    nrows = int(np.ceil(max(n, 1) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, 3.9 * nrows), squeeze=False)
    sources = list(dict.fromkeys(top["source"]))
    colors = palette(sources)
    label = "variant" if table is not None and "variant" in table else "method"
    for ax, tid in zip(axes.flat, ids, strict=False):
        rows = top[top["target_id"] == tid].sort_values(["rank", "source"])
        order = list(dict.fromkeys(rows.sort_values("rank")["token"]))
        sns.barplot(data=rows, x="token", y="prob", hue="source", order=order, hue_order=sources,
                    palette=colors, saturation=1, ax=ax)
        if table is not None and (table["target_id"] == tid).any():
            mine = table[table["target_id"] == tid]
            ax.set_title(target_title(mine.iloc[0], dict(zip(mine[label], mine["kl_nats"], strict=True))),
                         fontsize=9)
        else:
            ax.set_title(str(tid), fontsize=10)
        ax.set_xlabel("")
        ax.set_ylabel("probability" + (" (log scale)" if _log_axis(log_y, rows["prob"]) else ""))
        ax.tick_params(axis="x", rotation=60, labelsize=8)
        if _log_axis(log_y, rows["prob"]):
            ax.set_yscale("log")
            positive = rows["prob"][rows["prob"] > 0]
            ax.set_ylim(bottom=max(LOG_FLOOR, float(positive.min()) / 2) if len(positive) else LOG_FLOOR)
        ax.legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # off the bars
        sns.despine(ax=ax)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _log_axis(log_y: bool | str, probs: pd.Series) -> bool:
    """Whether to draw `probs` on a log axis: log_y True/False, or "auto" (span > LOG_AUTO_RATIO)."""
    if log_y == "auto":
        positive = probs[probs > 0]
        return len(positive) > 0 and float(positive.max()) > LOG_AUTO_RATIO * float(positive.min())
    if not isinstance(log_y, bool):
        raise ValueError(f"log_y={log_y!r}: use True, False or 'auto'.")
    return log_y


def kl_by(df: pd.DataFrame, *, x: str = "method", y: str = "kl_nats", hue: str | None = None,
          title: str | None = None, log_y: bool = False, ax=None):
    """Per-target points and their mean (with 95% CI) for each `x` value (and `hue`)."""
    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 4.5))
    fig = ax.figure
    colors = palette(df[hue if hue is not None else x])
    sns.stripplot(data=df, x=x, y=y, hue=hue if hue is not None else x, palette=colors, dodge=hue is not None,
                  alpha=0.4, size=3, ax=ax, legend=False)
    sns.pointplot(data=df, x=x, y=y, hue=hue, dodge=0.4 if hue is not None else False,
                  errorbar=("ci", 95), linestyle="none", markers="D", ax=ax,
                  palette=colors if hue is not None else None, color=None if hue is not None else "black")
    if log_y:
        ax.set_yscale("symlog", linthresh=1e-2)
    ax.set_ylabel("KL(target ‖ model) (nats)" if y == "kl_nats" else y)
    ax.set_title(title or f"{y} by {x}")
    sns.despine(ax=ax)
    fig.tight_layout()
    return fig


def traces(trace: pd.DataFrame, *, hue: str = "method", units: str = "target_id", log_y: bool = True,
           title: str | None = None, ax=None):
    """KL against optimisation step: one faint line per target, coloured by method."""
    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 4.5))
    fig = ax.figure
    sns.lineplot(data=trace, x="step", y="kl_nats", hue=hue, units=units, estimator=None,
                 palette=palette(trace[hue]) if hue is not None else None, alpha=0.3, linewidth=0.8, ax=ax)
    if log_y:
        ax.set_yscale("log")
    ax.set_ylabel("KL (nats)")
    ax.set_title(title or "optimisation traces")
    sns.despine(ax=ax)
    fig.tight_layout()
    return fig


def kl_vs_entropy_groups(df: pd.DataFrame, *, hue: str, col: str | None = None, x: str = "entropy_nats",
                         y: str = "kl_nats", bins: int = 8, max_entropy: float | None = None,
                         log_y: bool = False, title: str | None = None, col_wrap: int = 3):
    """KL against entropy, one colour per `hue` group (bounds included, not special), one panel per `col`.

    Per-target points and a line through each group's per-bin means (equal-width bins over
    [0, max_entropy or the largest x]); groups keep their first-seen order and colour in every
    panel. E.g. hue="group" (vanilla vs outlier settings), col="method" (soft | free_bound).
    """
    panels = list(dict.fromkeys(df[col])) if col is not None and not df.empty else [None]
    ncols = min(col_wrap, len(panels))
    nrows = int(np.ceil(len(panels) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 4.2 * nrows), squeeze=False, sharey=True)
    order = list(dict.fromkeys(df[hue])) if not df.empty else []
    colors = palette(order)
    top = max_entropy if max_entropy is not None else (float(df[x].max()) if not df.empty else 1.0)
    edges = analysis.entropy_bins(max(top, 1e-9), bins)
    for ax, panel in zip(axes.flat, panels, strict=False):
        rows = df if panel is None else df[df[col] == panel]
        for name in order:
            group = rows[rows[hue] == name]
            if group.empty:
                continue
            ax.scatter(group[x], group[y], s=12, alpha=0.35, color=colors[name])
            means = _bin_means(group, x, y, edges)
            ax.plot(means[x], means[y], marker="o", color=colors[name], label=str(name))
        if max_entropy is not None:
            ax.axvline(max_entropy, color="grey", linestyle=":", linewidth=1)
        if log_y:
            ax.set_yscale("symlog", linthresh=1e-2)
        ax.set_xlabel("target entropy (nats)")
        ax.set_ylabel("KL(target ‖ model) (nats)" if y == "kl_nats" else y)
        ax.set_title(str(panel) if panel is not None else "")
        ax.legend(frameon=False, fontsize=8)
        sns.despine(ax=ax)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    if title or not df.empty:
        fig.suptitle(title or f"KL vs target entropy by {hue}")
    fig.tight_layout()
    return fig


def stacked_gaps(parts: pd.DataFrame, *, col: str | None = None, title: str | None = None, col_wrap: int = 3):
    """The bottleneck hierarchy as stacked bars against entropy (from `analysis.hierarchy_parts`).

    One bar per entropy bin, stacking the mean part of each level in order (free-h bound at the
    bottom: what the output layer alone forces; then what each less free prompt adds), so the top
    of a level's segment is the running sum `top`. A negative mean part (an ordering violation on
    average) hangs down from the level below, in the level's colour, rather than being hidden.
    """
    panels = list(dict.fromkeys(parts[col])) if col is not None and not parts.empty else [None]
    ncols = min(col_wrap, len(panels))
    nrows = int(np.ceil(len(panels) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 4.2 * nrows), squeeze=False, sharey=True)
    levels = list(dict.fromkeys(parts["level"])) if not parts.empty else []
    colors = palette(levels)
    for ax, panel in zip(axes.flat, panels, strict=False):
        rows = parts if panel is None else parts[parts[col] == panel]
        for level in levels:
            band = rows[rows["level"] == level].sort_values("bin_mid")
            if band.empty:
                continue
            # one stacked bar per bin (bin-wide): a negative mean part is a bar hanging down
            ax.bar(band["bin_mid"], band["mean"], bottom=band["top"] - band["mean"],
                   width=0.9 * (band["bin_right"] - band["bin_left"]), color=colors[level], alpha=0.85,
                   label=level, edgecolor="white", linewidth=0.5)
        ax.set_xlabel("target entropy (nats), one bar per bin")
        ax.set_ylabel("mean KL (nats), stacked by level")
        ax.set_title(str(panel) if panel is not None else "")
        ax.legend(frameon=False, fontsize=8, loc="upper left")
        sns.despine(ax=ax)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title or "what each level of the hierarchy adds to the KL")
    fig.tight_layout()
    return fig

"""Figures from tidy tables: a DataFrame in, a matplotlib Figure out. Never imports torch.

Every function takes the long-form tables the runner and `dplib.analysis` produce (one row per
target × method × seed, or per token), draws with seaborn, and returns the Figure; saving is the
caller's (`Run.save_figure`). Nothing here computes a metric: summaries come from `analysis`.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

BOUND_STYLE = {"color": "black", "linestyle": "--", "linewidth": 1.6}


def _is_bound(df: pd.DataFrame, method_col: str) -> pd.Series:
    if "is_bound" in df:
        return df["is_bound"].fillna(False).astype(bool)
    return df[method_col].astype(str).str.endswith("_bound")


def _bin_means(df: pd.DataFrame, x: str, y: str, edges: np.ndarray) -> pd.DataFrame:
    idx = np.clip(np.searchsorted(edges, df[x].to_numpy(), side="right") - 1, 0, len(edges) - 2)
    mids = (edges[:-1] + edges[1:]) / 2
    out = df.assign(_mid=mids[idx]).groupby("_mid", as_index=False)[y].mean()
    return out.rename(columns={"_mid": x})


def kl_vs_entropy(df: pd.DataFrame, *, x: str = "entropy_nats", y: str = "kl_nats",
                  hue: str = "method", bins: int = 10, max_entropy: float | None = None,
                  log_y: bool = False, title: str | None = None, ax=None):
    """KL against target entropy: per-target points and per-bin mean lines per method; bounds as lines.

    Rows whose method is a bound (`is_bound` true, or a method name ending in "_bound") are drawn
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
    edges = np.linspace(0.0, max(top, 1e-9), bins + 1)
    bound = _is_bound(df, hue)
    prompts, bounds = df[~bound], df[bound]
    if not prompts.empty:
        order = list(dict.fromkeys(prompts[hue]))
        palette = dict(zip(order, sns.color_palette(n_colors=len(order)), strict=True))
        sns.scatterplot(data=prompts, x=x, y=y, hue=hue, hue_order=order, palette=palette,
                        alpha=0.45, s=18, ax=ax, legend=False)
        for name in order:
            means = _bin_means(prompts[prompts[hue] == name], x, y, edges)
            ax.plot(means[x], means[y], marker="o", color=palette[name], label=f"{name} (bin mean)")
    styles = ["--", ":", "-."]
    for i, (name, rows) in enumerate(bounds.groupby(hue, sort=False)):
        ax.scatter(rows[x], rows[y], s=8, color="black", alpha=0.25)
        means = _bin_means(rows, x, y, edges)
        ax.plot(means[x], means[y], **{**BOUND_STYLE, "linestyle": styles[i % 3]}, label=f"{name} (bound)")
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
    for (name, rows), color in zip(summary.groupby(hue, sort=False),
                                   sns.color_palette(n_colors=summary[hue].nunique()), strict=True):
        rows = rows.sort_values("bin_mid")
        ax.plot(rows["bin_mid"], rows["mean"], marker="o", color=color, label=name)
        ax.fill_between(rows["bin_mid"], rows["ci_low"], rows["ci_high"], color=color, alpha=0.2)
    return _finish(ax, "target entropy bin centre (nats)", "mean KL (nats)",
                   title or "mean KL per entropy bin (95% bootstrap CI)")


def distributions(top: pd.DataFrame, *, target_ids: Sequence[str] | None = None, col_wrap: int = 2,
                  log_y: bool = False, title: str | None = None):
    """Target vs achieved probabilities of each target's top tokens, tokens labelled on the x axis.

    `top` is `analysis.top_tokens(...)`: one row per (target_id, token, source). One panel per
    target; bars grouped by token (ordered by target rank), coloured by source.
    """
    ids = list(target_ids) if target_ids is not None else list(dict.fromkeys(top["target_id"]))
    n = len(ids)
    ncols = min(col_wrap, max(n, 1))
    nrows = int(np.ceil(max(n, 1) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, 3.6 * nrows), squeeze=False)
    sources = list(dict.fromkeys(top["source"]))
    palette = dict(zip(sources, ["#444444", *sns.color_palette(n_colors=max(len(sources) - 1, 1))], strict=False))
    for ax, tid in zip(axes.flat, ids, strict=False):
        rows = top[top["target_id"] == tid].sort_values(["rank", "source"])
        order = list(dict.fromkeys(rows.sort_values("rank")["token"]))
        sns.barplot(data=rows, x="token", y="prob", hue="source", order=order, hue_order=sources,
                    palette=palette, ax=ax)
        ax.set_title(str(tid), fontsize=10)
        ax.set_xlabel("")
        ax.set_ylabel("probability")
        ax.tick_params(axis="x", rotation=60, labelsize=8)
        if log_y:
            ax.set_yscale("log")
        ax.legend(frameon=False, fontsize=8)
        sns.despine(ax=ax)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def kl_by(df: pd.DataFrame, *, x: str = "method", y: str = "kl_nats", hue: str | None = None,
          title: str | None = None, log_y: bool = False, ax=None):
    """Per-target points and their mean (with 95% CI) for each `x` value (and `hue`)."""
    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 4.5))
    fig = ax.figure
    sns.stripplot(data=df, x=x, y=y, hue=hue, dodge=hue is not None, alpha=0.4, size=3, ax=ax, legend=False)
    sns.pointplot(data=df, x=x, y=y, hue=hue, dodge=0.4 if hue is not None else False,
                  errorbar=("ci", 95), linestyle="none", markers="D", ax=ax,
                  color=None if hue is not None else "black")
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
                 alpha=0.3, linewidth=0.8, ax=ax)
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
    palette = dict(zip(order, sns.color_palette(n_colors=max(len(order), 1)), strict=False))
    top = max_entropy if max_entropy is not None else (float(df[x].max()) if not df.empty else 1.0)
    edges = np.linspace(0.0, max(top, 1e-9), bins + 1)
    for ax, panel in zip(axes.flat, panels, strict=False):
        rows = df if panel is None else df[df[col] == panel]
        for name in order:
            group = rows[rows[hue] == name]
            if group.empty:
                continue
            ax.scatter(group[x], group[y], s=12, alpha=0.35, color=palette[name])
            means = _bin_means(group, x, y, edges)
            ax.plot(means[x], means[y], marker="o", color=palette[name], label=str(name))
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
    colors = dict(zip(levels, sns.color_palette("viridis", n_colors=max(len(levels), 1)), strict=False))
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

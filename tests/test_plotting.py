"""Plotting: figures from tidy frames, without torch; and the analysis summaries they draw."""

from __future__ import annotations

import subprocess
import sys

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from dplib import analysis, plotting  # noqa: E402


@pytest.fixture
def sweep():
    rng = np.random.default_rng(0)
    h = np.repeat(np.linspace(0, 5, 6), 4)
    rows = []
    for method, offset, bound in (("soft", 0.5, False), ("hard", 1.0, False), ("free_bound", 0.0, True)):
        for i, e in enumerate(h):
            rows.append({"target_id": f"t{i}", "method": method, "is_bound": bound, "entropy_nats": e,
                         "kl_nats": offset + np.sin(e / 5 * np.pi) + 0.1 * rng.random()})
    return pd.DataFrame(rows)


def test_plotting_never_imports_torch():
    # load the module file on its own (the dplib package's __init__ imports torch)
    code = ("import importlib.util, sys; "
            f"spec = importlib.util.spec_from_file_location('plotting_alone', {plotting.__file__!r}); "
            "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod); "
            "print(mod.kl_vs_entropy is not None, any(k.split('.')[0] == 'torch' for k in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True False"


def test_kl_vs_entropy_draws_points_method_lines_and_the_bound(sweep):
    fig = plotting.kl_vs_entropy(sweep, max_entropy=5.0, bins=3)
    ax = fig.axes[0]
    labels = [line.get_label() for line in ax.get_lines()]
    assert "soft (bin mean)" in labels and "hard (bin mean)" in labels and "free_bound (bound)" in labels
    bound_line = ax.get_lines()[labels.index("free_bound (bound)")]
    assert bound_line.get_linestyle() == "--" and len(bound_line.get_xdata()) == 3
    assert len(ax.collections) >= 2  # per-target scatter points
    plt.close(fig)


def test_bound_recognised_by_name_without_is_bound(sweep):
    fig = plotting.kl_vs_entropy(sweep.drop(columns="is_bound"))
    assert "free_bound (bound)" in [line.get_label() for line in fig.axes[0].get_lines()]
    plt.close(fig)


def test_empty_frame_gives_a_figure():
    fig = plotting.kl_vs_entropy(pd.DataFrame(columns=["entropy_nats", "kl_nats", "method"]))
    assert fig.axes
    plt.close(fig)


def test_distributions_labels_tokens():
    top = pd.DataFrame({
        "target_id": ["a"] * 4 + ["b"] * 4,
        "rank": [0, 0, 1, 1] * 2,
        "token_id": [5, 5, 7, 7] * 2,
        "token": ["␣the", "␣the", "cat", "cat"] * 2,
        "source": ["target", "soft"] * 4,
        "prob": [0.6, 0.5, 0.3, 0.2] * 2,
    })
    fig = plotting.distributions(top, col_wrap=1)
    assert len([ax for ax in fig.axes if ax.get_visible()]) == 2
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert ticks == ["␣the", "cat"]
    plt.close(fig)


def test_binned_kl_kl_by_and_traces(sweep):
    summary = analysis.bin_summary(sweep, bins=3)
    fig = plotting.binned_kl(summary)
    assert len(fig.axes[0].get_lines()) == 3
    plt.close(fig)
    fig = plotting.kl_by(sweep, x="method")
    assert fig.axes
    plt.close(fig)
    trace = pd.DataFrame({"target_id": ["a"] * 3 + ["b"] * 3, "method": "soft", "step": [0, 1, 2] * 2,
                          "kl_nats": [3.0, 2.0, 1.0, 4.0, 2.5, 2.0]})
    fig = plotting.traces(trace)
    assert len(fig.axes[0].get_lines()) >= 2
    plt.close(fig)


# ---- analysis: the tables the figures draw -------------------------------------------------


def test_bin_summary_means_sem_and_ci():
    df = pd.DataFrame({"method": "soft", "entropy_nats": [0.1, 0.2, 0.3, 2.9, 3.0],
                       "kl_nats": [1.0, 2.0, 3.0, 10.0, 20.0]})
    out = analysis.bin_summary(df, bins=[0.0, 1.5, 3.0])
    assert out["n"].tolist() == [3, 2]  # the right edge is closed: 3.0 lands in the last bin
    assert out["mean"].tolist() == pytest.approx([2.0, 15.0])
    assert out["sem"].iloc[0] == pytest.approx(1.0 / np.sqrt(3))
    assert (out["ci_low"] <= out["mean"]).all() and (out["mean"] <= out["ci_high"]).all()
    again = analysis.bin_summary(df, bins=[0.0, 1.5, 3.0])
    pd.testing.assert_frame_equal(out, again)  # the bootstrap is seeded
    with pytest.raises(KeyError, match="missing|not in the table"):
        analysis.bin_summary(df, value="nope")


def test_bin_summary_single_value_bins_and_groups():
    df = pd.DataFrame({"method": ["a", "b"], "entropy_nats": [0.5, 0.5], "kl_nats": [1.0, 2.0]})
    out = analysis.bin_summary(df, bins=2)
    assert out["method"].tolist() == ["a", "b"] and out["n"].tolist() == [1, 1]
    assert np.isnan(out["sem"]).all() and (out["ci_low"] == out["mean"]).all()
    wide = analysis.pivot_bins(out)
    assert list(wide.columns) == ["bin_left", "bin_right", "a", "b"]


def test_top_tokens_long_form(tiny):
    import torch

    model, tok = tiny
    p = torch.zeros(2, 384)
    p[0, 65], p[0, 66], p[1, 70] = 0.7, 0.3, 1.0
    q = torch.full((2, 384), 1.0 / 384).log()
    top = analysis.top_tokens(p, {"soft": q}, tok, n=2, target_ids=["x", "y"])
    assert list(top.columns) == ["target_id", "rank", "token_id", "token", "source", "prob"]
    assert len(top) == 2 * 2 * 2
    first = top[(top.target_id == "x") & (top.source == "target")]
    assert first["token_id"].tolist() == [65, 66] and first["prob"].tolist() == pytest.approx([0.7, 0.3])
    assert top[top.source == "soft"]["prob"].tolist() == pytest.approx([1 / 384] * 4)
    assert first["rank"].tolist() == [0, 1]


# ---- figures of notebooks 02–05 ---------------------------------------------------------------


def test_kl_vs_entropy_groups_one_panel_per_col_one_line_per_group(sweep):
    df = sweep.assign(group=np.where(sweep.index % 2 == 0, "vanilla", "k=3"))
    fig = plotting.kl_vs_entropy_groups(df, hue="group", col="method", bins=3, max_entropy=5.0)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == ["soft", "hard", "free_bound"]
    for ax in visible:
        labels = [line.get_label() for line in ax.get_lines()]
        assert "vanilla" in labels and "k=3" in labels
    plt.close(fig)
    fig = plotting.kl_vs_entropy_groups(df, hue="method")
    assert len(fig.axes) == 1
    plt.close(fig)


def test_stacked_gaps_stacks_levels_in_order():
    wide = pd.DataFrame({"target_id": ["a", "b", "c"], "kind": ["vanilla", "vanilla", "lm"],
                         "entropy_nats": [0.5, 1.5, 2.5], "free_bound": [0.1, 0.2, 0.3],
                         "soft": [0.5, 0.4, 0.9]})
    wide = analysis.hierarchy(wide.melt(id_vars=["target_id", "kind", "entropy_nats"], var_name="method",
                                        value_name="kl_nats"), levels=["free_bound", "soft"])
    parts = analysis.hierarchy_parts(wide, levels=["free_bound", "soft"], bins=[0.0, 1.0, 2.0, 3.0],
                                     by=["kind"])
    fig = plotting.stacked_gaps(parts, col="kind")
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == ["lm", "vanilla"]
    bars = visible[1].patches  # vanilla: free_bound's two bins, then soft's, stacked on them
    assert [round(b.get_y() + b.get_height(), 6) for b in bars] == [0.1, 0.2, 0.5, 0.4]
    assert [round(b.get_y(), 6) for b in bars] == [0.0, 0.0, 0.1, 0.2]
    assert visible[1].get_legend_handles_labels()[1] == ["free_bound", "soft"]
    plt.close(fig)


# ---- one colour per method, readable titles and tables (issue 19) ------------------------------


def _rgb(color):
    import matplotlib.colors as mcolors

    return mcolors.to_hex(color)


def _top(sources=("target", "soft", "hard"), probs=(0.6, 0.5, 0.3, 0.3, 0.2, 1e-5)):
    rows = []
    for tid in ("vanilla-temperature-s0-0",):
        for (rank, token), chunk in zip(enumerate(["␣the", "cat"]), (probs[:3], probs[3:]), strict=True):
            for source, p in zip(sources, chunk, strict=True):
                rows.append({"target_id": tid, "rank": rank, "token_id": rank, "token": token, "source": source,
                             "prob": p})
    return pd.DataFrame(rows)


def test_palette_gives_each_method_one_colour_whatever_else_is_drawn():
    one = plotting.palette(["hard", "soft"])
    two = plotting.palette(["group a", "soft", "free_bound", "hard"])
    assert one["soft"] == two["soft"] == plotting.METHOD_COLORS["soft"]
    assert one["hard"] == two["hard"] and two["free_bound"] == plotting.METHOD_COLORS["free_bound"]
    assert two["group a"] not in plotting.METHOD_COLORS.values()
    assert list(plotting.palette([3, 10])) == [3, 10]  # keys keep their type (seaborn looks them up as is)


def test_figures_draw_a_method_in_its_colour(sweep):
    soft = plotting.METHOD_COLORS["soft"]
    fig = plotting.kl_vs_entropy(sweep[sweep["method"] != "hard"], bins=3)
    lines = {line.get_label(): _rgb(line.get_color()) for line in fig.axes[0].get_lines()}
    assert lines["soft (bin mean)"] == soft
    plt.close(fig)
    fig = plotting.kl_vs_entropy_groups(sweep, hue="method", bins=3)
    lines = {line.get_label(): _rgb(line.get_color()) for line in fig.axes[0].get_lines()}
    assert lines["soft"] == soft and lines["hard"] == plotting.METHOD_COLORS["hard"]
    plt.close(fig)
    fig = plotting.distributions(_top(sources=("target", "hard", "soft")))
    bars = fig.axes[0].containers  # one container per source, in hue order
    assert [_rgb(c.patches[0].get_facecolor()) for c in bars] == [plotting.METHOD_COLORS[s]
                                                                   for s in ("target", "hard", "soft")]
    plt.close(fig)
    fig = plotting.kl_by(sweep.assign(L=np.where(sweep.index % 2 == 0, 3, 10)), x="L", hue="method")
    assert fig.axes  # integer x with a method hue: the palette's keys match the values
    plt.close(fig)


def test_distributions_titles_a_panel_with_kind_entropy_and_kl_per_method():
    table = pd.DataFrame({"target_id": ["vanilla-temperature-s0-0"] * 2, "method": ["soft", "free_bound"],
                          "kind": "vanilla", "entropy_nats": 3.0, "kl_nats": [0.12345, 0.01]})
    fig = plotting.distributions(_top(), table=table)
    title = fig.axes[0].get_title()
    assert title == "vanilla target, H = 3.00 nats\nKL (nats): soft 0.1235 · free_bound 0.0100"
    assert "s0-0" not in title
    plt.close(fig)
    row = {"kind": "outlier", "k": 3, "mass": 0.7, "entropy_nats": 2.0}
    assert plotting.target_title(row) == "outlier target (k = 3, m = 0.70), H = 2.00 nats"


def test_distributions_log_axis_on_request_or_when_probabilities_span_orders():
    for log_y, probs, expected in ((False, None, "linear"), (True, None, "log"), ("auto", None, "log"),
                                   ("auto", (0.6, 0.5, 0.3, 0.3, 0.2, 0.1), "linear")):
        fig = plotting.distributions(_top(**({"probs": probs} if probs else {})), log_y=log_y)
        assert fig.axes[0].get_yscale() == expected
        if expected == "log":
            assert fig.axes[0].get_ylim()[0] == pytest.approx(5e-6)  # half the smallest bar: every bar visible
        plt.close(fig)
    with pytest.raises(ValueError, match="auto"):
        plotting.distributions(_top(), log_y="yes")


def test_readable_fixed_decimals_never_scientific():
    df = pd.DataFrame({"method": ["soft"], "kl_nats": [0.000012345], "top10_recall": [1e-4], "tv": [0.5],
                       "wall_s": [12.345], "steps": [300]})
    html = plotting.readable(df).to_html()
    assert "0.0000" in html and "0.0001" in html and "0.5000" in html and "12.3" in html and ">300<" in html
    assert "e-" not in html.replace("style", "")
    assert plotting.readable(df).data is df

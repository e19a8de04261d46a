"""Plotting: figures from tidy frames, without torch; and the analysis summaries they draw."""

from __future__ import annotations

import ast
from pathlib import Path

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


def test_plotting_imports_no_torch_and_computes_through_analysis():
    # plotting draws; what it computes (bin means) comes from dplib.analysis, and it imports no torch itself
    tree = ast.parse(Path(plotting.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported |= {"." + a.name if node.level else node.module.split(".")[0] for a in node.names}
    assert "torch" not in imported
    assert {n for n in imported if n.startswith(".")} == {".analysis"}
    assert "searchsorted" not in Path(plotting.__file__).read_text()  # no binning of its own


def test_kl_vs_entropy_draws_points_method_lines_and_the_bound(sweep):
    fig = plotting.kl_vs_entropy(sweep, max_entropy=5.0, bins=3)
    ax = fig.axes[0]
    labels = [line.get_label() for line in ax.get_lines()]
    assert "soft (bin mean)" in labels and "hard (bin mean)" in labels and "free_bound (bound)" in labels
    bound_line = ax.get_lines()[labels.index("free_bound (bound)")]
    assert bound_line.get_linestyle() == "--" and len(bound_line.get_xdata()) == 3
    assert len(ax.collections) >= 2  # per-target scatter points
    plt.close(fig)


def test_bounds_come_from_the_is_bound_column_not_the_name(sweep):
    # layer_bound is a local optimum (is_bound False): drawn as a method, not as a bound line
    renamed = sweep.assign(method=sweep["method"].replace({"hard": "layer_bound"}))
    labels = [line.get_label() for line in plotting.kl_vs_entropy(renamed).axes[0].get_lines()]
    assert "layer_bound (bin mean)" in labels and "layer_bound (bound)" not in labels
    labels = [line.get_label() for line in plotting.kl_vs_entropy(sweep.drop(columns="is_bound")).axes[0].get_lines()]
    assert "free_bound (bin mean)" in labels and not any(label.endswith("(bound)") for label in labels)
    plt.close("all")


def test_empty_frame_gives_a_figure():
    fig = plotting.kl_vs_entropy(pd.DataFrame(columns=["entropy_nats", "kl_nats", "method"]))
    assert [t.get_text() for t in fig.axes[0].texts] == ["no rows"]
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
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["soft", "hard", "free_bound"]
    plt.close(fig)
    trace = pd.DataFrame({"target_id": ["a"] * 3 + ["b"] * 3, "method": "soft", "step": [0, 1, 2] * 2,
                          "kl_nats": [3.0, 2.0, 1.0, 4.0, 2.5, 2.0]})
    fig = plotting.traces(trace)
    assert len(fig.axes[0].get_lines()) >= 2
    plt.close(fig)


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
    # integer x with a method hue: one x position per L, points coloured by method (the palette's keys match)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["3", "10"]
    assert {_rgb(c.get_facecolor()[0]) for c in fig.axes[0].collections if len(c.get_offsets())} >= {
        soft, plotting.METHOD_COLORS["hard"]}
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

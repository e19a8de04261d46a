"""dplib.analysis: per-bin summaries, the top-token table, the comparison tables of notebooks 02–05
(matched differences, paired comparisons, the projection rows) and the bottleneck hierarchy. Small
hand-made tables whose answers are known."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from dplib import analysis

# ---- matched_difference ---------------------------------------------------------------------


@pytest.fixture
def grid_table():
    """Vanilla at entropies 1, 2, 3, 4 (KL = h + noise); group "out" only at 2 and 3 (KL = h − 0.5)."""
    rows = []
    for h in (1.0, 2.0, 3.0, 4.0):
        for r, eps in enumerate((-0.1, 0.0, 0.1)):
            rows.append({"group": "vanilla", "requested_entropy_nats": h, "kl_nats": h + eps, "rep": r})
    for h in (2.0, 3.0):
        for r, eps in enumerate((-0.2, 0.2)):
            rows.append({"group": "out", "requested_entropy_nats": h, "kl_nats": h - 0.5 + eps, "rep": r})
    return pd.DataFrame(rows)


def test_matched_difference_uses_only_matched_strata(grid_table):
    out = analysis.matched_difference(grid_table, column="group", baseline="vanilla", bins=[0.0, 5.0])
    (row,) = out.to_dict("records")
    # only h = 2 and 3 count: the vanilla rows at 1 and 4 (which would shift the mean) are left out
    assert row["n_strata"] == 2 and row["n"] == 4 and row["n_baseline"] == 6
    assert row["mean_baseline"] == pytest.approx(2.5) and row["mean"] == pytest.approx(2.0)
    assert row["diff"] == pytest.approx(0.5)
    # sem = sqrt(Σ_s var_b/n_b + var_g/n_g) / S with var_b = 0.01, var_g = 0.08
    assert row["sem"] == pytest.approx(np.sqrt(2 * (0.01 / 3 + 0.08 / 2)) / 2)
    assert row["ci_low"] < row["diff"] < row["ci_high"]
    again = analysis.matched_difference(grid_table, column="group", baseline="vanilla", bins=[0.0, 5.0])
    pd.testing.assert_frame_equal(out, again)  # seeded bootstrap


def test_matched_difference_bins_groups_and_by(grid_table):
    out = analysis.matched_difference(grid_table, column="group", baseline="vanilla", bins=[0.0, 2.5, 5.0])
    assert out["bin_left"].tolist() == [0.0, 2.5] and out["n_strata"].tolist() == [1, 1]
    assert out["diff"].tolist() == pytest.approx([0.5, 0.5])
    two = pd.concat([grid_table.assign(model="a"), grid_table.assign(model="b", kl_nats=grid_table.kl_nats * 2)])
    out = analysis.matched_difference(two, column="group", baseline="vanilla", by=["model"], bins=[0.0, 5.0])
    assert out["model"].tolist() == ["a", "b"] and out["diff"].tolist() == pytest.approx([0.5, 1.0])
    with pytest.raises(KeyError, match="not in the table"):
        analysis.matched_difference(grid_table, column="nope", baseline="vanilla")


def test_matched_difference_single_row_strata_have_nan_sem(grid_table):
    one = grid_table.drop_duplicates(["group", "requested_entropy_nats"])
    out = analysis.matched_difference(one, column="group", baseline="vanilla", bins=[0.0, 5.0])
    assert np.isnan(out["sem"]).all() and out["ci_low"].iloc[0] == pytest.approx(out["ci_high"].iloc[0])


# ---- paired_comparison, group_summary, with_projection ---------------------------------------


@pytest.fixture
def methods_table():
    rng = np.random.default_rng(0)
    soft = rng.uniform(1.0, 2.0, 20)
    rows = [{"target_id": f"t{i}", "method": "soft", "L": 5, "kl_nats": s} for i, s in enumerate(soft)]
    rows += [{"target_id": f"t{i}", "method": "hard", "L": 5, "kl_nats": s + 1.0} for i, s in enumerate(soft)]
    rows += [{"target_id": f"t{i}", "method": "half", "L": 5, "kl_nats": s / 2} for i, s in enumerate(soft)]
    return pd.DataFrame(rows)


def test_paired_comparison_gap_and_relative_reduction(methods_table):
    out = analysis.paired_comparison(methods_table, column="method", control="soft").set_index("method")
    assert list(out.index) == ["hard", "half"]
    assert out.loc["hard", "gap"] == pytest.approx(1.0) and out.loc["hard", "gap_sem"] == pytest.approx(0.0)
    assert out.loc["hard", "frac_lower"] == 0.0 and out.loc["half", "frac_lower"] == 1.0
    assert out.loc["half", "relative_reduction"] == pytest.approx(0.5)
    assert out.loc["half", "rr_ci_low"] == pytest.approx(0.5) and out.loc["half", "rr_ci_high"] == pytest.approx(0.5)
    assert out.loc["hard", "n"] == 20 and out.loc["hard", "control"] == "soft"
    assert out.loc["half", "gap_ci_low"] <= out.loc["half", "gap"] <= out.loc["half", "gap_ci_high"]


def test_paired_comparison_pairs_only_complete_pairs_and_by(methods_table):
    part = methods_table[~((methods_table.method == "hard") & (methods_table.target_id.isin(["t0", "t1"])))]
    out = analysis.paired_comparison(part, column="method", control="soft", treatments="hard")
    assert out["n"].tolist() == [18]
    two = pd.concat([methods_table, methods_table.assign(L=10, kl_nats=methods_table.kl_nats * 3)])
    out = analysis.paired_comparison(two, column="method", control="soft", treatments=["hard"], by=["L"])
    assert out["L"].tolist() == [5, 10] and out["gap"].tolist() == pytest.approx([1.0, 3.0])
    with pytest.raises(ValueError, match="repeat"):
        analysis.paired_comparison(two, column="method", control="soft")  # L not in by: pairs repeat


def test_paired_comparison_with_a_pair_column():
    """LM targets against their own entropy-matched random controls (different target ids)."""
    df = pd.DataFrame({"source": ["own", "own", "random", "random"], "pair_id": ["a", "b", "a", "b"],
                       "target_id": ["a", "b", "ra", "rb"], "kl_nats": [1.0, 2.0, 4.0, 2.0]})
    out = analysis.paired_comparison(df, column="source", control="random", pair="pair_id")
    assert out["relative_reduction"].iloc[0] == pytest.approx(1 - 1.5 / 3.0)
    assert out["gap"].iloc[0] == pytest.approx(-1.5) and out["frac_lower"].iloc[0] == 0.5


def test_group_summary(methods_table):
    out = analysis.group_summary(methods_table, by=["method", "L"])
    assert out["method"].tolist() == ["half", "hard", "soft"] and (out["n"] == 20).all()
    soft = methods_table[methods_table.method == "soft"]["kl_nats"]
    row = out.set_index("method").loc["soft"]
    assert row["mean"] == pytest.approx(soft.mean()) and row["sem"] == pytest.approx(soft.std() / np.sqrt(20))
    assert row["ci_low"] < row["mean"] < row["ci_high"]


def test_with_projection_adds_projected_rows():
    df = pd.DataFrame({"target_id": ["a", "b", "a"], "method": ["soft", "soft", "free_bound"],
                       "variant": ["soft_L5", "soft_L5", "free_bound"], "is_bound": [False, False, True],
                       "kl_nats": [1.0, 2.0, 0.5], "projected_kl_nats": [3.0, np.nan, np.nan]})
    out = analysis.with_projection(df)
    assert len(out) == 4
    new = out.iloc[3]
    assert (new["method"], new["variant"], new["kl_nats"], new["target_id"]) == ("soft_projected",
                                                                                "soft_projected_L5", 3.0, "a")
    assert not new["is_bound"]
    pd.testing.assert_frame_equal(out.iloc[:3], df)


# ---- the hierarchy ------------------------------------------------------------------------------


@pytest.fixture
def levels_table():
    """Three targets; t2 lacks hard; t1 has soft below layer_bound (a violation of 0.2 nats)."""
    kl = {"t0": [0.1, 0.2, 0.4, 0.8, 1.6], "t1": [0.1, 0.3, 0.6, 0.4, 2.0], "t2": [1.0, 1.0, 1.5, 2.0, None]}
    rows = []
    for i, (t, values) in enumerate(kl.items()):
        for level, v in zip(analysis.HIERARCHY, values, strict=True):
            if v is not None:
                rows.append({"target_id": t, "kind": "vanilla", "entropy_nats": float(i), "method": level,
                             "kl_nats": v})
    return pd.DataFrame(rows)


def test_hierarchy_parts_sum_to_the_top_level(levels_table):
    wide = analysis.hierarchy(levels_table).set_index("target_id")
    assert wide.loc["t0", "part_free_bound"] == pytest.approx(0.1)
    assert wide.loc["t0", "part_hard"] == pytest.approx(0.8)
    assert wide.loc["t1", "part_soft"] == pytest.approx(-0.2)  # a violation stays visible
    assert np.isnan(wide.loc["t2", "hard"]) and np.isnan(wide.loc["t2", "part_hard"])
    parts = wide[[f"part_{lv}" for lv in analysis.HIERARCHY]].sum(axis=1, skipna=True)
    assert parts.tolist() == pytest.approx([1.6, 2.0, 2.0])
    assert wide["n_levels"].tolist() == [5, 5, 4] and wide.loc["t2", "kind"] == "vanilla"


def test_hierarchy_skips_a_missing_level_and_rejects_duplicates(levels_table):
    no_norm = levels_table[~((levels_table.target_id == "t0") & (levels_table.method == "norm_bound"))]
    wide = analysis.hierarchy(no_norm).set_index("target_id")
    assert wide.loc["t0", "part_layer_bound"] == pytest.approx(0.3)  # relative to free_bound, the level below
    with pytest.raises(ValueError, match="several rows"):
        analysis.hierarchy(pd.concat([levels_table, levels_table.iloc[:1]]))


def test_ordering_violations(levels_table):
    wide = analysis.hierarchy(levels_table)
    out = analysis.ordering_violations(wide).set_index("lower")
    assert out.loc["layer_bound", "upper"] == "soft"
    assert out.loc["layer_bound", "n_violations"] == 1 and out.loc["layer_bound", "max_excess_nats"] == pytest.approx(0.2)
    assert out.loc["soft", "n"] == 2 and out["n_violations"].sum() == 1
    assert analysis.ordering_violations(wide, tol=0.5)["n_violations"].sum() == 0


def test_hierarchy_parts_and_ratio_of_means(levels_table):
    wide = analysis.hierarchy(levels_table)
    parts = analysis.hierarchy_parts(wide, bins=[0.0, 3.0])
    assert parts["level"].tolist() == list(analysis.HIERARCHY)
    assert parts["n"].tolist() == [3, 3, 3, 3, 2]
    soft_top = parts.set_index("level").loc["soft", "top"]
    assert soft_top == pytest.approx(np.mean([0.8, 0.4, 2.0]))  # the running sum = mean soft KL
    share = analysis.ratio_of_means(wide, "free_bound", "soft", bins=[0.0, 1.5, 3.0])
    assert share["n"].tolist() == [2, 1]
    assert share["ratio"].tolist() == pytest.approx([0.2 / 1.2, 0.5])
    assert (share["ci_low"] <= share["ratio"] + 1e-12).all()
    overall = analysis.ratio_of_means(wide, "free_bound", "soft", bins=None)
    assert overall["ratio"].tolist() == pytest.approx([1.2 / 3.2]) and overall["n"].tolist() == [3]


def test_target_group_labels():
    df = pd.DataFrame({"kind": ["vanilla", "outlier", "outlier", "lm"], "k": [np.nan, 3.0, 10.0, np.nan],
                       "mass": [np.nan, 0.5, 0.2, np.nan]})
    assert analysis.target_group(df).tolist() == ["vanilla", "outlier k=3 m=0.5", "outlier k=10 m=0.2", "lm"]
    assert analysis.target_group(df[["kind"]]).tolist() == ["vanilla", "outlier", "outlier", "lm"]
    assert analysis.target_group(df, {"mass": "mass"}).tolist()[1] == "outlier mass=0.5"


def test_with_bound_gap_matches_each_target_to_its_free_bound_row():
    df = pd.DataFrame({"model": ["m"] * 6 + ["n"] * 2,
                       "method": ["soft", "soft", "free_bound", "free_bound", "hard", "hard", "soft", "free_bound"],
                       "target_id": ["a", "b", "a", "b", "a", "c", "a", "a"],
                       "kl_nats": [1.0, 2.0, 0.25, 0.5, 3.0, 1.0, 5.0, 4.0]})
    out = analysis.with_bound_gap(df)
    assert out.index.equals(df.index) and list(out.columns[:4]) == list(df.columns)
    gap = out["gap_to_free_bound_nats"].tolist()
    assert gap[:5] == [0.75, 1.5, 0.0, 0.0, 2.75] and gap[6:] == [1.0, 0.0]  # per model and target
    assert math.isnan(gap[5])  # target c has no bound row


# ---- the soft prompt's projection, in words --------------------------------------------------------


def test_projection_note_explains_and_flags_a_projection_equal_to_the_initial_tokens():
    import torch

    from dplib.optim.common import Result

    def soft(prompt_ids, init_ids, text):
        return Result(method="soft", target_ids=["t"], kl=torch.tensor([0.25]), initial_kl=torch.tensor([4.0]),
                      logprobs=torch.zeros(1, 4), steps=torch.tensor([10]), trace=torch.zeros(11, 1), wall_s=1.0,
                      prompt_ids=torch.tensor([prompt_ids]), prompt_text=[text], projected_kl=torch.tensor([3.5]),
                      meta={"init_ids": [init_ids]})

    moved = analysis.projection_note(soft([5, 6], [7, 8], "ab"))
    assert "nearest real token" in moved and "ids [5, 6], text 'ab'" in moved
    assert "0.2500" in moved and "3.5000" in moved and "initial tokens" not in moved
    same = analysis.projection_note(soft([7, 8], [7, 8], None))
    assert "initial tokens" in same and "no text re-tokenises" in same
    hard = soft([7, 8], [7, 8], None)
    hard.method = "hard"
    with pytest.raises(ValueError, match="soft Result"):
        analysis.projection_note(hard)


# ---- the one bootstrap helper, seeded per group ------------------------------------------------------


def test_bootstrap_interval_stratified_paired_and_degenerate():
    rng = np.random.default_rng(1)
    a, b = rng.normal(1.0, 0.1, 50), rng.normal(0.0, 0.1, 40)
    lo, hi = analysis.bootstrap_interval(lambda x, y: x.mean(1) - y.mean(1), [a, b], seed=3)
    assert lo < 1.0 < hi and hi - lo < 0.1
    assert (lo, hi) == analysis.bootstrap_interval(lambda x, y: x.mean(1) - y.mean(1), [a, b], seed=3)
    pairs = np.column_stack([a[:40], a[:40] + 0.5])  # paired rows resample together: the gap is exactly 0.5
    assert analysis.bootstrap_interval(lambda p: (p[..., 1] - p[..., 0]).mean(1), [pairs]) == pytest.approx((0.5, 0.5))
    assert analysis.bootstrap_interval(lambda x: x.mean(1), [np.array([2.0])]) == (2.0, 2.0)
    assert all(np.isnan(analysis.bootstrap_interval(lambda x: x.mean(1), [np.array([])])))
    with pytest.raises(ValueError, match="shape"):
        analysis.bootstrap_interval(lambda x: x, [a])
    # a ratio whose resampled denominator can be 0: infinite replicates are kept, not dropped
    lo, hi = analysis.bootstrap_interval(lambda p: p[..., 0].mean(1) / p[..., 1].mean(1),
                                         [np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]])])
    assert np.isinf(hi) and np.isfinite(lo)


def test_adding_a_group_moves_no_other_groups_interval(methods_table, grid_table):
    soft = methods_table[methods_table.method == "soft"]
    more = pd.concat([methods_table, soft.assign(method="extra", kl_nats=soft.kl_nats * 3)])
    a = analysis.paired_comparison(methods_table, column="method", control="soft")
    b = analysis.paired_comparison(more, column="method", control="soft")
    pd.testing.assert_frame_equal(a, b[b["method"] != "extra"].reset_index(drop=True))
    a = analysis.group_summary(methods_table)
    b = analysis.group_summary(more)
    pd.testing.assert_frame_equal(a, b[b["method"] != "extra"].reset_index(drop=True))
    a = analysis.matched_difference(grid_table, column="group", baseline="vanilla", bins=[0.0, 5.0])
    extra = grid_table[grid_table.group == "out"].assign(group="other", kl_nats=lambda d: d.kl_nats + 1)
    b = analysis.matched_difference(pd.concat([grid_table, extra]), column="group", baseline="vanilla", bins=[0.0, 5.0])
    pd.testing.assert_frame_equal(a, b[b["group"] == "out"].reset_index(drop=True))


def test_bin_summary_range_by_gives_each_model_its_own_range():
    df = pd.DataFrame({"model": ["a"] * 4 + ["b"] * 4, "method": "soft",
                       "entropy_nats": [0.0, 1.0, 3.0, 4.0, 0.0, 2.0, 6.0, 8.0], "kl_nats": 1.0})
    out = analysis.bin_summary(df, by=["model", "method"], bins=2, range_by=["model"])
    assert out.groupby("model")["bin_right"].max().to_dict() == {"a": 4.0, "b": 8.0}
    assert out["n"].tolist() == [2, 2, 2, 2]
    with pytest.raises(ValueError, match="range_by"):
        analysis.bin_summary(df, by=["method"], bins=2, range_by=["model"])


# ---- bin_summary and top_tokens ----------------------------------------------------------


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

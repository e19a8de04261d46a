"""Verdicts (dplib.findings) on synthetic tables whose answer is known: each verdict function is
shown a table where its claim holds, one where the opposite holds, and one where the data cannot
decide; and each refuses a table that lacks what it needs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dplib import findings

RNG_SEED = 0


def _noise(n, scale, seed):
    return np.random.default_rng(seed).normal(0.0, scale, n)


# ---- decide -------------------------------------------------------------------------------------


@pytest.mark.parametrize("lo, hi, direction, expected", [
    (0.1, 0.5, "greater", "holds"), (-0.5, -0.1, "greater", "fails"), (-0.1, 0.5, "greater", "undecided"),
    (-0.5, -0.1, "less", "holds"), (0.1, 0.5, "less", "fails"), (np.nan, 0.5, "greater", "undecided"),
    (0.1, np.inf, "greater", "holds")])
def test_decide(lo, hi, direction, expected):
    assert findings.decide(lo, hi, null=0.0, direction=direction) == expected


def test_decide_needs_enough_rows_and_a_direction():
    assert findings.decide(0.1, 0.5, null=0.0, direction="greater", enough=False) == "undecided"
    with pytest.raises(ValueError, match="direction"):
        findings.decide(0.1, 0.5, null=0.0, direction="up")


# ---- entropy hump -------------------------------------------------------------------------------


def _entropy_table(shape, per_point=6, noise=0.02, n_points=12, top=10.0, model="m", method="soft"):
    """KL = shape(h) + noise at n_points entropies over [0, top], per_point targets each."""
    grid = np.repeat(np.linspace(0.0, top, n_points), per_point)
    kl = np.maximum(shape(grid) + _noise(len(grid), noise, 1), 1e-4)
    return pd.DataFrame({"model": model, "method": method, "entropy_nats": grid, "kl_nats": kl,
                         "target_id": [f"t{i}" for i in range(len(grid))]})


def test_entropy_hump_holds_for_a_hump():
    df = _entropy_table(lambda h: 0.1 + np.sin(np.pi * h / 10.0))
    out = findings.entropy_hump(df, bins=6)
    assert list(out.columns) == findings.COLUMNS
    assert out["verdict"].tolist() == ["holds", "holds"]
    assert out["claim"].tolist() == [findings.HUMP_LOW, findings.HUMP_HIGH]
    low = out.iloc[0]
    assert low["ci_low"] <= low["value"] <= low["ci_high"] and low["value"] > 3
    assert "hardest interior bin" in low["note"] and low["scope"] == "m · soft"


def test_entropy_hump_fails_against_the_end_that_is_hardest():
    df = _entropy_table(lambda h: 0.05 + 0.1 * h)  # monotone: the high end is the hardest
    out = findings.entropy_hump(df, bins=6).set_index("claim")
    assert out.loc[findings.HUMP_LOW, "verdict"] == "holds"
    assert out.loc[findings.HUMP_HIGH, "verdict"] == "fails" and out.loc[findings.HUMP_HIGH, "ci_high"] < 1


def test_entropy_hump_undecided_when_flat_or_too_few():
    flat = _entropy_table(lambda h: 1.0 + 0 * h, noise=0.3)
    assert set(findings.entropy_hump(flat, bins=6)["verdict"]) <= {"undecided", "fails"}
    assert "undecided" in set(findings.entropy_hump(flat, bins=6)["verdict"])
    one = _entropy_table(lambda h: 0.1 + np.sin(np.pi * h / 10.0), per_point=1, n_points=6)
    out = findings.entropy_hump(one, bins=6)  # one target per bin: a bootstrap has no spread
    assert (out["verdict"] == "undecided").all() and out["note"].str.contains("too few").all()


def test_entropy_hump_per_group_bins_and_errors():
    two = pd.concat([_entropy_table(lambda h: 0.1 + np.sin(np.pi * h / 10.0)),
                     _entropy_table(lambda h: 0.1 + np.sin(np.pi * h / 12.0), top=12.0, model="n")])
    out = findings.entropy_hump(two, bins=6)
    assert out["scope"].tolist() == ["m · soft"] * 2 + ["n · soft"] * 2
    assert out["note"].str.contains("bin 0.00–1.67 nats").sum() == 1  # m: [0, 10]; n: [0, 12] in 6 bins
    assert out["note"].str.contains("bin 0.00–2.00 nats").sum() == 1
    with pytest.raises(KeyError, match="entropy_nats"):
        findings.entropy_hump(two.drop(columns="entropy_nats"))
    with pytest.raises(ValueError, match="lowest bin"):
        findings.entropy_hump(two[two["entropy_nats"] > 0.5], bins=[0.0, 0.4, 5.0, 12.0])
    with pytest.raises(ValueError, match="empty"):
        findings.entropy_hump(two.iloc[:0])


def test_entropy_hump_adding_a_group_does_not_move_another_groups_interval():
    one = _entropy_table(lambda h: 0.1 + np.sin(np.pi * h / 10.0))
    two = pd.concat([one, one.assign(model="z", kl_nats=one["kl_nats"] * 2)])
    a = findings.entropy_hump(one)
    b = findings.entropy_hump(two)
    pd.testing.assert_frame_equal(a, b[b["scope"] == "m · soft"].reset_index(drop=True))


# ---- outliers at matched entropy ------------------------------------------------------------------


def _outlier_table(delta, noise=0.05, per_point=4, grid=(1.0, 2.0, 3.0, 4.0, 5.0, 6.0)):
    """vanilla KL = h/4 + noise at every grid point; "out" = vanilla − delta, at all but the first point."""
    rows = []
    for g, points in (("vanilla", grid), ("out", grid[1:])):
        for h in points:
            kl = h / 4 + _noise(per_point, noise, int(h * 10) + len(g)) - (delta if g == "out" else 0.0)
            rows += [{"method": "soft", "group": g, "requested_entropy_nats": h, "kl_nats": v} for v in kl]
    return pd.DataFrame(rows)


def test_outliers_easier_holds_fails_undecided():
    holds = findings.outliers_easier(_outlier_table(0.3), bins=3)
    head = holds[holds["headline"]]
    assert len(head) == 1 and head["verdict"].iloc[0] == "holds"
    assert head["value"].iloc[0] == pytest.approx(0.3, abs=0.05)
    assert head["n"].iloc[0] == 5 * 4 and "holds in 2 of 2 entropy bins" in head["note"].iloc[0]  # "out" lies in bins 2–4, 4–6
    detail = holds[~holds["headline"]]
    assert len(detail) == 2 and detail["scope"].str.contains("bin").all()
    fails = findings.outliers_easier(_outlier_table(-0.3), bins=3)
    assert (fails["verdict"] == "fails").all()
    assert set(findings.outliers_easier(_outlier_table(0.0, noise=0.5), bins=3)["verdict"]) >= {"undecided"}


def test_outliers_easier_single_target_strata_are_undecided():
    one = _outlier_table(0.3, per_point=1)
    out = findings.outliers_easier(one, bins=3)
    assert (out["verdict"] == "undecided").all() and out["note"].str.contains("too few").all()


def test_outliers_easier_checks_its_input():
    df = _outlier_table(0.3)
    with pytest.raises(ValueError, match="vanilla"):
        findings.outliers_easier(df[df["group"] != "vanilla"])
    with pytest.raises(ValueError, match="nothing to compare"):
        findings.outliers_easier(df[df["group"] == "vanilla"])
    with pytest.raises(KeyError, match="requested_entropy_nats"):
        findings.outliers_easier(df.drop(columns="requested_entropy_nats"))
    nan = df.assign(kl_nats=df["kl_nats"].where(df.index != 0))
    assert "1 rows without a finite kl_nats left out" in findings.outliers_easier(nan, bins=3)["note"].iloc[0]


# ---- LM targets against matched random ones --------------------------------------------------------


def _lm_table(own_factor, mapped_factor, n=12):
    control = 1.0 + np.abs(_noise(n, 0.3, 3))
    rows = []
    for i, c in enumerate(control):
        rows.append({"model": "m", "method": "soft", "source": "random", "pair_id": f"o{i}", "kl_nats": c,
                     "mass_lost": np.nan, "source_model": np.nan})
        rows.append({"model": "m", "method": "soft", "source": "own", "pair_id": f"o{i}", "kl_nats": c * own_factor,
                     "mass_lost": np.nan, "source_model": "m"})
        rows.append({"model": "m", "method": "soft", "source": "random", "pair_id": f"x{i}", "kl_nats": c,
                     "mass_lost": np.nan, "source_model": np.nan})
        rows.append({"model": "m", "method": "soft", "source": "mapped", "pair_id": f"x{i}",
                     "kl_nats": c * mapped_factor[i % len(mapped_factor)], "mass_lost": 0.01 * (i % 3),
                     "source_model": "other"})
    return pd.DataFrame(rows)


def test_lm_targets_easier_holds_fails_undecided_with_mass_lost():
    out = findings.lm_targets_easier(_lm_table(0.5, [1.3])).set_index("scope")
    assert out.loc["m · soft · same model", "verdict"] == "holds"
    assert out.loc["m · soft · same model", "value"] == pytest.approx(0.5)
    mapped = out.loc["m · soft · mapped from other"]
    assert mapped["verdict"] == "fails" and mapped["value"] == pytest.approx(-0.3)
    assert "mass lost in the mapping: mean 0.01, max 0.02" in mapped["note"]
    mixed = findings.lm_targets_easier(_lm_table(0.5, [0.4, 1.6])).set_index("scope")
    assert mixed.loc["m · soft · mapped from other", "verdict"] == "undecided"
    few = findings.lm_targets_easier(_lm_table(0.5, [1.0], n=1))
    assert (few["verdict"] == "undecided").all()


def test_lm_targets_easier_checks_its_input():
    df = _lm_table(0.5, [1.3])
    with pytest.raises(ValueError, match="random"):
        findings.lm_targets_easier(df[df["source"] != "random"])
    with pytest.raises(ValueError, match="no rows with source"):
        findings.lm_targets_easier(df[df["source"] == "random"])
    with pytest.raises(KeyError, match="mass_lost"):
        findings.lm_targets_easier(df.drop(columns="mass_lost"))
    assert len(findings.lm_targets_easier(df.drop(columns="mass_lost"), mass_lost=None)) == 2


# ---- hard vs soft, bound share, proposers ----------------------------------------------------------


def _methods_table(hard_shift, n=10, lengths=(1, 5)):
    rows = []
    for L in lengths:
        soft = 1.0 + np.abs(_noise(n, 0.3, L))
        for i, s in enumerate(soft):
            rows.append({"cfg_prompt_length": L, "method": "soft", "target_id": f"t{i}", "kl_nats": s})
            rows.append({"cfg_prompt_length": L, "method": "hard", "target_id": f"t{i}",
                         "kl_nats": s + hard_shift[i % len(hard_shift)]})
    return pd.DataFrame(rows)


def test_hard_vs_soft_per_length():
    out = findings.hard_vs_soft(_methods_table([1.0]))
    assert out["scope"].tolist() == ["L = 1", "L = 5"] and (out["verdict"] == "holds").all()
    assert out["value"].tolist() == pytest.approx([1.0, 1.0]) and out["claim"].iloc[0] == findings.PAIRED_CLAIMS["hard"]
    assert (findings.hard_vs_soft(_methods_table([-0.5]))["verdict"] == "fails").all()
    assert (findings.hard_vs_soft(_methods_table([-2.0, 2.1]))["verdict"] == "undecided").all()
    assert (findings.hard_vs_soft(_methods_table([1.0], n=1))["verdict"] == "undecided").all()
    with pytest.raises(ValueError, match="hard"):
        findings.hard_vs_soft(_methods_table([1.0]).query("method == 'soft'"))


def _bound_table(share, n_per_bin=6, model="m"):
    h = np.repeat(np.linspace(0.0, 10.0, 5), n_per_bin)
    soft = 1.0 + np.abs(_noise(len(h), 0.2, 7))
    ids = [f"t{i}" for i in range(len(h))]
    return pd.concat([
        pd.DataFrame({"model": model, "method": "soft", "target_id": ids, "entropy_nats": h, "kl_nats": soft}),
        pd.DataFrame({"model": model, "method": "free_bound", "target_id": ids, "entropy_nats": h,
                      "kl_nats": soft * share}),
        pd.DataFrame({"model": model, "method": "hard", "target_id": ids[:3], "entropy_nats": h[:3], "kl_nats": 9.0}),
    ], ignore_index=True)


def test_bound_share_per_bin_and_overall():
    out = findings.bound_share(_bound_table(0.8), bins=5)
    head = out[out["headline"]]
    assert len(head) == 1 and head["value"].iloc[0] == pytest.approx(0.8) and head["verdict"].iloc[0] == "holds"
    assert head["n"].iloc[0] == 30 and "holds in 5 of 5 entropy bins" in head["note"].iloc[0]
    assert out.loc[~out["headline"], "value"].tolist() == pytest.approx([0.8] * 5)
    assert (findings.bound_share(_bound_table(0.2), bins=5)["verdict"] == "fails").all()
    few = findings.bound_share(_bound_table(0.8, n_per_bin=1), bins=5)
    assert (few.loc[~few["headline"], "verdict"] == "undecided").all()
    two = pd.concat([_bound_table(0.8), _bound_table(0.2, model="n")])  # same target ids on two models
    assert findings.bound_share(two, bins=5).query("headline")["verdict"].tolist() == ["holds", "fails"]
    with pytest.raises(ValueError, match="free_bound"):
        findings.bound_share(_bound_table(0.8).query("method != 'free_bound'"))


def test_proposers_beat_instructions():
    tasks = ["coin", "die", "ten", "yes", "colour"]
    base = pd.DataFrame({"model": "m", "method": "instruction", "task": tasks, "kl_answers_nats": [1.0, 2.0, 1.5, 0.8, 1.2]})
    better = base.assign(method="hard", kl_answers_nats=base["kl_answers_nats"] * 0.3)
    worse = base.assign(method="soft", kl_answers_nats=base["kl_answers_nats"] + 1.0)
    out = findings.proposers_beat_instructions(pd.concat([base, better, worse])).set_index("scope")
    assert out.loc["m · hard", "verdict"] == "holds" and out.loc["m · soft", "verdict"] == "fails"
    assert out.loc["m · hard", "n"] == 5 and out.loc["m · hard", "direction"] == "less"
    few = findings.proposers_beat_instructions(pd.concat([base, better]).query("task in ['coin', 'die']"))
    assert few["verdict"].tolist() == ["undecided"]


# ---- the prose ---------------------------------------------------------------------------------


def test_prose_states_every_headline_number_from_the_rows():
    verdicts = findings.combine(findings.hard_vs_soft(_methods_table([1.0])),
                                findings.bound_share(_bound_table(0.2), bins=5))
    text = findings.prose(verdicts)
    for row in verdicts[verdicts["headline"]].to_dict("records"):
        assert findings.sentence(row) in text
        assert f"{row['value']:.3g}" in text and findings.interval(row) in text
    assert "Per entropy bin (5 bins over all groups): 0 holds, 5 fails, 0 undecided" in text
    assert "Of 3 headline verdicts at 95% confidence: 2 holds, 1 fails, 0 undecided." in text
    assert findings.prose(verdicts.iloc[:0]).startswith("No verdicts")
    with pytest.raises(KeyError, match="verdict"):
        findings.prose(verdicts.drop(columns="verdict"))


def test_prose_says_why_a_verdict_is_undecided():
    wide = findings.prose(findings.hard_vs_soft(_methods_table([-2.0, 2.1])))
    assert "**undecided** (the interval includes 0)" in wide
    few = findings.prose(findings.hard_vs_soft(_methods_table([1.0], n=2)))
    assert "**undecided** (too few targets to judge)" in few


def test_entropy_hump_against_an_end_at_zero_kl_is_infinite_not_negative():
    """A bound reaches the uniform target exactly and reports -1e-16 there: the sign of rounding
    must not turn the ratio negative (a decisive 'fails')."""
    df = _entropy_table(lambda h: 0.1 + np.sin(np.pi * h / 10.0))
    top = df["entropy_nats"] > 9.0
    df.loc[top, "kl_nats"] = -1e-16
    out = findings.entropy_hump(df, bins=6).set_index("claim")
    high = out.loc[findings.HUMP_HIGH]
    assert np.isinf(high["value"]) and high["value"] > 0 and high["verdict"] == "holds"
    assert "∞" in findings.prose(out.reset_index())
    df.loc[:, "kl_nats"] = 0.0  # nothing is hard anywhere: 0 / 0 is undecided
    assert (findings.entropy_hump(df, bins=6)["verdict"] == "undecided").all()

"""Experiment designs (dplib.designs): the outlier-feasibility filter, the hard-prompt subset, the
entropy-matched random controls."""

from __future__ import annotations

import math

import pytest
import torch

from dplib import designs, targets


def test_feasible_entropies_keep_exactly_the_points_where_outliers_exist():
    vocab, k, m = 384, 3, 0.5
    grid = [0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 5.9, 3.0]
    kept = designs.feasible_entropies(vocab, grid, k, m)
    assert kept == [h for h in grid if any(lo <= m <= hi for lo, hi in targets.feasible_masses(vocab, h, k))]
    assert kept == [3.0, 4.0, 3.0]  # too little entropy below, too much above (m/k must top the rest); repeats kept
    targets.outliers(vocab, kept, k, m, seed=0)  # every kept point builds
    for h in sorted(set(grid) - set(kept)):
        with pytest.raises(targets.TargetError):
            targets.outliers(vocab, [h], k, m, seed=0)


def test_first_per_entropy_is_the_first_n_of_each_grid_point():
    grid = targets.entropy_grid(100, 4).repeat_interleave(3)
    batch = targets.vanilla(100, grid.tolist(), seed=0)
    sub = designs.first_per_entropy(batch, 1)
    assert sub.ids == [batch.ids[i] for i in (0, 3, 6, 9)]
    assert designs.first_per_entropy(batch, 2).ids == [batch.ids[i] for i in range(12) if i % 3 < 2]
    assert len(designs.first_per_entropy(batch, 5)) == 12
    with pytest.raises(ValueError, match="int ≥ 1"):
        designs.first_per_entropy(batch, 0)
    with pytest.raises(KeyError, match="requested_entropy_nats"):
        designs.first_per_entropy(targets.Targets(batch.probs), 1)


def _lm_like(n, vocab, seed, prefix):
    probs = torch.softmax(torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed)) * 3, dim=-1)
    return targets.Targets(probs, targets.Targets(probs).meta.assign(
        kind="lm", target_id=[f"{prefix}-{i}" for i in range(n)]))


def test_with_matched_controls_pairs_each_lm_target_with_a_control_at_its_entropy():
    own, other = _lm_like(3, 200, 0, "own"), _lm_like(2, 200, 1, "map")
    batch = designs.with_matched_controls({"own": own, "mapped": other}, 200, seed=0)
    meta = batch.meta
    assert meta["source"].tolist() == ["own"] * 3 + ["mapped"] * 2 + ["random"] * 5
    assert meta["pair_id"].tolist() == own.ids + other.ids + own.ids + other.ids
    lm, controls = batch.entropy[:5], batch.entropy[5:]
    assert torch.allclose(lm, controls, atol=1e-5)
    assert not math.isclose(float(lm[0]), float(lm[1]))  # the controls follow each target, not one entropy
    with pytest.raises(ValueError, match="more than one source"):
        designs.with_matched_controls({"own": own, "again": own}, 200, seed=0)
    with pytest.raises(ValueError, match="no LM targets"):
        designs.with_matched_controls({}, 200, seed=0)

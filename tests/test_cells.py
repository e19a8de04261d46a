"""Tests for dplib.cells: a cell's key is the identity of what it computes."""

from __future__ import annotations

import torch

from dplib import cells, optim
from dplib.optim import HardConfig, SoftConfig
from dplib.results import stable_hash
from dplib.targets import Targets


def batch() -> Targets:
    return Targets.from_probs(torch.softmax(torch.randn(2, 50, generator=torch.Generator().manual_seed(0)), -1))


def test_key_changes_with_what_is_computed():
    b = batch()
    key = cells.cell_key("fp", "soft", SoftConfig(), 0, b)
    assert key == cells.cell_key("fp", "soft", SoftConfig(), 0, batch())  # equal inputs, equal keys
    assert len(key) == cells.KEY_CHARS
    others = [cells.cell_key("fp2", "soft", SoftConfig(), 0, b), cells.cell_key("fp", "soft", SoftConfig(steps=9), 0, b),
              cells.cell_key("fp", "soft", SoftConfig(), 1, b),
              cells.cell_key("fp", "soft", SoftConfig(), 0, Targets.from_probs(b.probs.flip(1)))]
    assert len({key, *others}) == 5


def test_revision_renews_a_methods_keys_only(monkeypatch):
    """Bumping a method's revision gives its cells new keys (older ones are recomputed, never served);
    a method at revision 1 keeps the keys it had before revisions existed."""
    b = batch()
    plain = {"model": "fp", "method": "soft", "config": SoftConfig(), "seed": 0, "targets": b.ids,
             "probs": cells.probs_fingerprint(b.probs)}
    assert cells.cell_key("fp", "soft", SoftConfig(), 0, b) == stable_hash(plain, cells.KEY_CHARS)
    before = cells.cell_key("fp", "hard", HardConfig(), 0, b)
    monkeypatch.setitem(optim.REVISIONS, "hard", optim.REVISIONS["hard"] + 1)
    assert cells.cell_key("fp", "hard", HardConfig(), 0, b) != before
    assert cells.cell_key("fp", "soft", SoftConfig(), 0, b) == stable_hash(plain, cells.KEY_CHARS)


def test_bounds_are_the_output_layer_methods_or_a_result_that_says_so():
    assert cells.is_bound_method("free_bound") and cells.is_bound_method("norm_bound")
    assert not cells.is_bound_method("layer_bound")  # a local optimum through the upper layers, not a bound
    assert not cells.is_bound_method("soft")

    class Certified:
        meta = {"is_bound": True}

    assert cells.is_bound_method("my_bound_method", Certified())

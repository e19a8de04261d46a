"""dplib.methods: the forms `run_sweep(methods=...)` accepts, and each cell's config."""

from __future__ import annotations

import pytest

from dplib import methods, optim
from dplib.seeds import derive_seed


def test_registry_has_every_method():
    assert {"soft", "hard", "free_bound", "norm_bound", "layer_bound"} <= set(optim.METHODS)
    assert set(optim.METHODS) == set(optim.CONFIGS)  # every method has its config class


def test_method_specs_forms():
    assert [(s.method, s.name) for s in methods.method_specs(["soft", "free_bound"])] == [
        ("soft", "soft"), ("free_bound", "free_bound")]
    specs = methods.method_specs({"soft": {"steps": 3}, "soft_L9": ("soft", {"prompt_length": 9})})
    assert [(s.method, s.name, dict(s.params)) for s in specs] == [
        ("soft", "soft", {"steps": 3}), ("soft", "soft_L9", {"prompt_length": 9})]
    with pytest.raises(ValueError, match="unique"):
        methods.method_specs(["soft", "soft"])
    with pytest.raises(TypeError, match="list of method names"):
        methods.method_specs("soft")
    with pytest.raises(TypeError, match="a list holds method names"):
        methods.method_specs([("hard", {}, "h")])
    with pytest.raises(KeyError, match="unknown method"):
        methods.make_config(methods.MethodSpec("nope"), 0)


def test_make_config_derives_the_cell_seed():
    config = methods.make_config(methods.MethodSpec("soft", {"steps": 3}), 7)
    assert config.steps == 3 and config.seed == derive_seed(7, "soft")
    assert methods.make_config(methods.MethodSpec("soft"), 8).seed != config.seed

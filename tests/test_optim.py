"""The contract every optimiser in `dplib.optim.METHODS` meets, on a tiny model.

Parametrised over the registry, so a new method is tested as soon as it is registered. If its
defaults are slow on the tiny model, add ONE line to FAST_PARAMS with cheap settings.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dplib.optim import CONFIGS, METHODS
from dplib.optim.common import Result
from dplib.targets import TargetError, Targets, logits_width

# Cheap settings per method for the tiny model; fields not listed keep their defaults. Methods not
# listed get `steps`/`prompt_length` shortened automatically where their config has them.
FAST_PARAMS: dict[str, dict] = {
    "soft": {"steps": 25, "prompt_length": 3, "lr": 0.05},
    "hard": {"steps": 10, "prompt_length": 3, "top_k": 32, "n_candidates": 32},
    "layer_bound": {"steps": 25, "prompt_length": 3, "lr": 0.05},
    "free_bound": {},
    "norm_bound": {},
}

FRAME_COLUMNS = {"target_id", "method", "kl_nats", "initial_kl_nats", "improvement_nats", "steps", "wall_s"}


def fast_config(name: str, **overrides):
    cls = CONFIGS[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    params = {k: v for k, v in {"steps": 15, "prompt_length": 3}.items() if k in fields}
    params |= FAST_PARAMS.get(name, {}) | overrides
    return cls(**params)


@pytest.fixture(scope="module")
def reachable(tiny):
    """Two targets a real prompt reaches exactly: the tiny model's distributions after BOS + 3 real tokens."""
    model, tok = tiny
    rows = []
    with torch.no_grad():
        for text in ["The quick brown", "def f(x):"]:
            ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"][:3]
            rows.append(model(torch.tensor([ids])).logits[0, -1].float().softmax(-1))
    return Targets(torch.stack(rows), None)


def test_registry_is_consistent():
    assert set(METHODS) == set(CONFIGS)
    for name in ("soft", "free_bound", "norm_bound", "layer_bound"):
        assert name in METHODS


@pytest.mark.parametrize("name", sorted(METHODS))
def test_config_round_trips_through_plain_values(name):
    config = CONFIGS[name]()
    assert CONFIGS[name](**dataclasses.asdict(config)) == config
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seed = 1  # type: ignore[misc]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_loss_decreases_on_reachable_target(name, tiny, reachable):
    model, tok = tiny
    result = METHODS[name](model, tok, reachable, fast_config(name), progress=False)
    assert isinstance(result, Result) and result.method == name
    assert torch.isfinite(result.kl).all()
    assert (result.kl < result.initial_kl).all()
    assert (result.kl >= -1e-6).all()
    assert result.logprobs.shape == (2, logits_width(model))
    assert result.trace.shape[1] == 2 and result.steps.shape == (2,)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_same_seed_same_trace(name, tiny, reachable):
    model, tok = tiny
    a = METHODS[name](model, tok, reachable, fast_config(name), progress=False)
    b = METHODS[name](model, tok, reachable, fast_config(name), progress=False)
    torch.testing.assert_close(a.trace, b.trace, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(a.kl, b.kl, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_result_frame_and_meta(name, tiny, reachable):
    model, tok = tiny
    result = METHODS[name](model, tok, reachable, fast_config(name), progress=False)
    frame = result.to_frame()
    assert FRAME_COLUMNS <= set(frame.columns)
    assert len(frame) == 2 and (frame["method"] == name).all()
    assert frame["target_id"].tolist() == reachable.ids
    assert not frame["kl_nats"].isna().any()
    # the 'stuck' signal: initial − best, in every optimiser's rows
    torch.testing.assert_close(torch.tensor(frame["improvement_nats"].to_numpy()),
                               torch.tensor(frame["initial_kl_nats"] - frame["kl_nats"]).double())
    assert result.meta["config"] == dataclasses.asdict(fast_config(name))
    assert isinstance(result.meta["is_bound"], bool)
    trace = result.trace_frame()
    assert {"target_id", "method", "step", "kl_nats"} <= set(trace.columns) and len(trace) > 0


@pytest.mark.parametrize("name", sorted(METHODS))
def test_wrong_width_is_rejected_before_any_compute(name, tiny):
    model, tok = tiny
    width = logits_width(model)
    bad = Targets(torch.full((1, width - 1), 1.0 / (width - 1)), None)

    def forbid(*args):
        raise AssertionError("a forward pass ran before the width check")

    handles = [m.register_forward_pre_hook(forbid) for m in model.modules()]
    try:
        with pytest.raises(TargetError, match="width"):
            METHODS[name](model, tok, bad, fast_config(name), progress=False)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_wrong_config_type_is_rejected(name, tiny, reachable):
    model, tok = tiny
    other = next(cls for n, cls in CONFIGS.items() if cls is not CONFIGS[name])
    with pytest.raises(TypeError):
        METHODS[name](model, tok, reachable, other(), progress=False)

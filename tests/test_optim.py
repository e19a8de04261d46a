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


# ---- stopping from outside: the `callback` keyword of the prompt optimisers ----------------------


@pytest.mark.parametrize("name", ["soft", "hard"])
def test_callback_stops_the_run_keeping_the_best_prompt_so_far(name, tiny, reachable):
    """callback(step, best_kl) is called once per step; True stops the run. The result is the best
    prompt so far, and its reported KL is what that prompt reaches through the model's own forward."""
    from dplib.lm import kl_from_logprobs

    model, tok = tiny
    config = fast_config(name, steps=50, **({"project": False} if name == "soft" else {}))
    calls = []

    def stop_at_third(step, best_kl):
        calls.append((step, best_kl))
        return len(calls) == 3

    result = METHODS[name](model, tok, reachable, config, progress=False, callback=stop_at_third)
    assert len(calls) == 3 and [s for s, _ in calls] == ([0, 1, 2] if name == "soft" else [1, 2, 3])
    assert all(isinstance(b, float) for _, b in calls)
    assert [b for _, b in calls] == sorted((b for _, b in calls), reverse=True)  # a best so far never rises
    assert calls[-1][1] == pytest.approx(float(result.kl.mean()), abs=1e-5)
    assert int(result.steps.max()) <= 3 < config.steps
    bos = torch.full((len(reachable), 1), tok.bos_token_id)
    with torch.no_grad():
        if name == "soft":
            embeds = torch.cat([model.get_input_embeddings()(bos).float(), result.prompt_embeds], 1)
            logits = model(inputs_embeds=embeds).logits
        else:
            logits = model(torch.cat([bos, result.prompt_ids], 1)).logits
    own = kl_from_logprobs(reachable.probs, logits[:, -1].float().log_softmax(-1))
    torch.testing.assert_close(result.kl, own, atol=1e-4, rtol=1e-4)
    short = dataclasses.replace(config, steps=5)
    full = METHODS[name](model, tok, reachable, short, progress=False, callback=lambda step, kl: False)
    torch.testing.assert_close(full.trace, METHODS[name](model, tok, reachable, short, progress=False).trace)


def test_soft_callback_stop_covers_every_chunk(tiny, reachable):
    """Stopped in the first chunk of targets, later chunks only score their initial prompts."""
    model, tok = tiny
    config = fast_config("soft", steps=20, max_batch=1, project=False)
    result = METHODS["soft"](model, tok, reachable, config, progress=False, callback=lambda step, kl: step == 2)
    assert result.steps.tolist() == [2, 0] and torch.isfinite(result.kl).all()
    torch.testing.assert_close(result.kl[1], result.initial_kl[1])


@pytest.mark.parametrize("name", ["soft", "hard"])
def test_progress_bar_ends_complete_when_stopped_early(name, tiny, reachable, monkeypatch):
    """A bar closed short of its total is drawn in tqdm's error colour in a notebook; an early stop is no error."""
    import importlib
    import io

    from tqdm import tqdm as base

    bars = []

    class Recording(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "file": io.StringIO()})
            bars.append(self)

    module = {"soft": "prompt_vectors"}.get(name, name)  # soft runs on the prompt-vector engine
    monkeypatch.setattr(importlib.import_module(f"dplib.optim.{module}"), "tqdm", Recording)
    extra = {"project": False} if name == "soft" else {}
    METHODS[name](*tiny, reachable, fast_config(name, steps=40, **extra), progress=True,
                  callback=lambda step, kl: step == 2)
    assert bars and all(bar.n == bar.total for bar in bars)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_trace_and_steps_mean_the_same_for_every_method(name, tiny, reachable):
    """trace (n_rows, T): row 0 is the KL at the initial point, every later row the KL where the method
    stood after one more step (NaN once a target stopped); kl is the trace's minimum. A prompt
    optimiser's steps count each target's rows after row 0; a bound's rows are its solver's iterates
    and its steps solver iterations."""
    model, tok = tiny
    result = METHODS[name](model, tok, reachable, fast_config(name), progress=False)
    trace = result.trace.double()
    torch.testing.assert_close(trace[0], result.initial_kl.double(), atol=1e-5, rtol=0)
    best = torch.nan_to_num(trace, nan=float("inf")).min(dim=0).values
    torch.testing.assert_close(best, result.kl.double(), atol=1e-4, rtol=1e-4)
    if not result.meta["is_bound"]:  # prompt optimisers: steps = the rows after row 0
        ran = (~result.trace.isnan()).sum(dim=0) - 1
        assert ran.tolist() == result.steps.tolist()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_batch_gives_the_same_result_as_separate_runs(name, tiny, reachable):
    model, tok = tiny
    together = METHODS[name](model, tok, reachable, fast_config(name), progress=False)
    for i in range(len(reachable)):
        alone = METHODS[name](model, tok, reachable[[i]], fast_config(name), progress=False)
        torch.testing.assert_close(alone.kl[0], together.kl[i], atol=1e-4, rtol=1e-4)

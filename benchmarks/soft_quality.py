"""Soft-prompt quality: KL reached against steps and wall time, per variant, with the gap to the free-h bound.

Fixed seeded targets across the entropy range (issue 18: `targets.vanilla(width, [0.5, 2, 3.5, 5, 6, 7,
8, 9, 10, 10.5], seed=0)`, L = 5) on each embedded model. For each variant (a set of `SoftConfig`
overrides) it prints, per target: entropy H, KL reached, the free-h bound, the gap (KL − bound) and
the improvement over the initial KL; then per variant: mean KL, mean gap, targets without
improvement, the best-so-far KL at a few step counts (from `Result.trace`) and wall time as a ratio
to the first variant measured in the same run ("old": the defaults before issue 18).

    .venv/bin/python benchmarks/soft_quality.py                              # old vs new defaults, both models
    .venv/bin/python benchmarks/soft_quality.py --model smollm2-135m --variant lr03:lr=0.03,schedule=cosine
    .venv/bin/python benchmarks/soft_quality.py --json out.json             # also write every number

A variant is `name:key=value,key=value` (SoftConfig fields; values parsed as Python literals).
Projection onto tokens is off in every variant (it is the same for all and not what is compared).
Goals (issue 18), at the new defaults on SmolLM2: no target without improvement, H = 7 at ≤ 3.6
nats, mean gap to the free-h bound ≤ half the old defaults', wall time ≤ 2× the old defaults'.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import math

import torch

from dplib import load_model
from dplib import targets as tg
from dplib.optim import BestTracker, BoundConfig, SoftConfig, free_bound, optimize_soft

ENTROPIES = [0.5, 2, 3.5, 5, 6, 7, 8, 9, 10, 10.5]
MODELS = ["smollm2-135m", "gemma3-270m"]
# The defaults before issue 18, spelled out so the comparison survives later default changes.
OLD = {"steps": 300, "lr": 0.01, "schedule": "constant", "patience": 0, "restarts": 1}
VARIANTS = {"old": OLD, "new": {}}
CHECKPOINTS = (50, 100, 200, 300, 600)
# Early-stopping rules replayed on each variant's trace: (patience, min_rel_improvement, min_steps).
STOP_RULES = [(20, 0.0, 0), (20, 0.001, 100), (20, 0.01, 100), (50, 0.01, 100)]


def replay_stopping(trace: torch.Tensor, patience: int, min_rel: float, min_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(best KL, steps) per target had the rule stopped it: exact for restarts = 1 (rows never
    interact, so stopping one changes nothing else); for R > 1 it replays the per-step best over
    restarts, an approximation of stopping each restart on its own."""
    tracker = BestTracker(trace.shape[1], patience, min_rel_improvement=min_rel, min_steps=min_steps)
    for step in range(trace.shape[0]):
        tracker.update(torch.nan_to_num(trace[step].float(), nan=math.inf), step)
        if tracker.done:
            break
    return tracker.best, tracker.steps


def parse_variant(text: str) -> tuple[str, dict]:
    if text in VARIANTS:
        return text, dict(VARIANTS[text])
    name, _, body = text.partition(":")
    kwargs = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value
    return name, kwargs


def soft_config(kwargs: dict) -> SoftConfig:
    fields = SoftConfig.__dataclass_fields__
    return SoftConfig(**{"prompt_length": 5, "project": False, **{k: v for k, v in kwargs.items() if k in fields}})


def best_so_far(trace: torch.Tensor, step: int) -> torch.Tensor:
    """(T,) best KL over steps 0..step of a (steps + 1, T) trace (NaN after a stop ignored)."""
    part = torch.nan_to_num(trace[: step + 1].double(), nan=math.inf)
    return part.min(0).values


def run_model(name: str, variants: list[tuple[str, dict]], threads: int) -> dict:
    torch.set_num_threads(threads)
    model, tok = load_model(name, device="cpu")
    targets = tg.vanilla(tg.logits_width(model), ENTROPIES, seed=0)
    bound = free_bound(model, tok, targets, BoundConfig(), progress=False)
    print(f"\n== {name}: free-h bound for {len(targets)} targets in {bound.wall_s:.1f} s", flush=True)
    optimize_soft(model, tok, targets, soft_config({"steps": 1}), progress=False)  # warm-up
    out = {"model": name, "entropy": ENTROPIES, "bound": bound.kl.double().tolist(), "variants": {}}
    base_wall = None
    for vname, kwargs in variants:
        config = soft_config(kwargs)
        r = optimize_soft(model, tok, targets, config, progress=False)
        kl = r.kl.double()
        gap = kl - bound.kl.double()
        improvement = r.initial_kl.double() - kl
        base_wall = base_wall or r.wall_s
        at = {s: best_so_far(r.trace, s).mean().item() for s in CHECKPOINTS if s <= config.steps}
        out["variants"][vname] = {"config": {k: v for k, v in vars(config).items()}, "kl": kl.tolist(),
                                  "gap": gap.tolist(), "improvement": improvement.tolist(),
                                  "steps": r.steps.tolist(), "wall_s": r.wall_s, "mean_kl_at_step": at,
                                  "trace": r.trace.tolist()}
        print(f"\n-- {name} / {vname}: {kwargs}", flush=True)
        print(f"{'H':>5} {'KL':>7} {'bound':>7} {'gap':>7} {'improv':>7} {'steps':>5}")
        for i, h in enumerate(ENTROPIES):
            print(f"{h:>5} {kl[i]:>7.3f} {bound.kl[i]:>7.3f} {gap[i]:>7.3f} {improvement[i]:>7.3f} "
                  f"{int(r.steps[i]):>5}")
        stuck = int((improvement <= 1e-3).sum())
        steps_txt = "  ".join(f"@{s}: {v:.3f}" for s, v in at.items())
        print(f"mean KL {kl.mean():.3f}  mean gap {gap.mean():.3f}  no improvement {stuck}/{len(kl)}  "
              f"wall {r.wall_s:.1f} s ({r.wall_s / base_wall:.2f}× first variant)  mean KL {steps_txt}",
              flush=True)
        if config.patience == 0:
            for rule in STOP_RULES:
                best, steps = replay_stopping(r.trace, *rule)
                print(f"   replayed stop (patience, min_rel, min_steps) = {rule}: mean KL {best.mean():.3f}  "
                      f"mean gap {(best.double() - bound.kl.double()).mean():.3f}  steps {steps.tolist()}  "
                      f"(≈ {steps.double().mean() / (config.steps + 1):.2f} of the steps)")
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", choices=MODELS, help="model(s); default both")
    parser.add_argument("--variant", action="append", help="variant(s): 'old', 'new' or name:key=value,...")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="write every number to this JSON file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    variants = [parse_variant(v) for v in (args.variant or ["old", "new"])]
    results = [run_model(m, variants, args.threads) for m in (args.model or MODELS)]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

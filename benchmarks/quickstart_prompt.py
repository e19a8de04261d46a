"""The quickstart's hard prompt, shared by the benchmarks that take one apart (`hard_neighbourhood.py`,
`hard_kl_parts.py`): their command-line options for the target and the search, and the search itself.

The target is vanilla (notebook 00's: H = 3 nats, seed 0 by default); the prompt is what the default
hard search finds for it at the quickstart's budget (L = 5, 40 steps x 128 candidates by default).
"""

from __future__ import annotations

import argparse
import time

import torch

from dplib.models import load_model
from dplib.optim import HardConfig, optimize_hard
from dplib.targets import Targets, logits_width, vanilla


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """--model, --device, --entropy, --seed (the target) and --length, --steps (the search run first)."""
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--entropy", type=float, default=3.0, help="the vanilla target's entropy, nats")
    ap.add_argument("--seed", type=int, default=0, help="the vanilla target's seed")
    ap.add_argument("--length", type=int, default=5, help="L of the search run first (no --text)")
    ap.add_argument("--steps", type=int, default=40, help="steps of the search run first (no --text)")


def load(args: argparse.Namespace):
    """(model, tokenizer, targets): the model named by --model and the one vanilla target (1, vocab)."""
    model, tokenizer = load_model(args.model, device=args.device)
    print(f"# {args.model} on {next(model.parameters()).device} ({torch.get_num_threads()} threads), "
          f"torch {torch.__version__}")
    return model, tokenizer, vanilla(logits_width(model), [args.entropy], seed=args.seed)


def search_config(args: argparse.Namespace, steps: int | None = None) -> HardConfig:
    """The search's budget: L = --length, `steps` (default --steps) x 128 candidates, no early stop."""
    return HardConfig(prompt_length=args.length, steps=args.steps if steps is None else steps,
                      n_candidates=128, patience=0)


def found_prompt(model, tokenizer, targets: Targets, config: HardConfig) -> str:
    """Run the default hard search on the (one) target and return its prompt text, printing its KL."""
    t = time.perf_counter()
    found = optimize_hard(model, tokenizer, targets, config, progress=False)
    text = found.prompt_text[0]
    print(f"search (L = {config.prompt_length}, {config.steps} x {config.n_candidates}): KL "
          f"{float(found.kl[0]):.4f} for {text!r} in {time.perf_counter() - t:.0f} s")
    return text

"""How far does the hard-prompt search reach, per forward pass and per second? Search variants side by side.

Fixed, seeded target sets on smollm2-135m (every variant searches the same targets from the same start):
  one_token   8 ordinary word tokens (" " + 4-8 lowercase letters, drawn with a seeded generator), as
              one-hot targets: their KL is exactly GCG's cross-entropy, so this is the budget on which
              dplib was compared with nanoGCG (L = 10, 50 steps, B = 128, top-k 128, one swap, start
              "x x … x", ASCII tokens; nanoGCG reached mean 0.25, worst 0.87 there);
  quickstart  notebook 00's target (vanilla, H = 3 nats, seed 0) at its budget (L = 5, 40 × 128, top-k 256);
  entropy     vanilla targets at H = 1, 3, 5, 7 nats, L = 10, 30 steps × 128, top-k 256;
  notebook    vanilla targets at H = 1, 2, …, 8 nats at notebook 01's hard budget (L = 5, 20 steps × 64,
              top-k 256): what the study's hard cells get (`--steps`, `--candidates` scale it).
  planted     8 targets a hard prompt is known to reach: the model's own next-token distribution after
              seeded random 5-token prompts (allowed tokens, each re-tokenising to itself), 2 each with
              entropy nearest 1, 3, 5, 7 nats (of 400 drawn), so KL 0 is attainable at L = 5; at the
              quickstart's budget (40 × 128). How far the search stays above 0 here is the search's own
              shortfall; on the vanilla sets it is also the target's.
  lm          8 of the model's own next-token distributions at corpus positions (`targets.from_model`,
              seed 0; contexts of 8-64 tokens, so not all are reachable at L = 5), the kind notebooks 03
              and 05 prompt; at the quickstart's budget (40 × 128).
For every set but one_token the soft prompt at its defaults (L as the set's) is run once, for the hard − soft gap.

Variants (HardConfig overrides on the set's budget; "v0" is dplib ≤ 0.x's search):
  v0          pure descent (move only on improvement), gradient proposals only, whole sequences scored,
              from random tokens
  move        v0 + GCG's move (always stand on the step's best candidate, return the best seen)
  copy        v0 + copy proposals (25 % of candidates place one of the target's own tokens)
  random_init move + copy from random tokens (init="random": the defaults until 2026-12-03)
  default     today's HardConfig defaults (move + copy, from the target's own most probable tokens)
  swaps       default + 2 positions per candidate at the first step, 1 at the last
  restart     default + restarts from the 8 best prompts after 10 steps without a new best
  target_init default without the set's init_text: the one-token set then starts from its word repeated,
              not from "x x … x" (on the vanilla sets, which have no init_text, the same as default)
  soft_init   default, started from the soft prompt's nearest tokens (vanilla sets; where every
              projection re-tokenises to itself: `init_text=tuple(soft.prompt_text)`)

For each set and variant, in one run: the mean / median / worst KL after 1/4, 1/2 and all of the
steps (with the forward passes, i.e. candidates scored, per target up to there), wall seconds and
CPU seconds per target (process time: every thread's). Targets of a set are searched as one batch.

    .venv/bin/python benchmarks/hard_quality.py                      # everything (about three and a half hours on 2 cores)
    .venv/bin/python benchmarks/hard_quality.py --sets one_token --variants v0,default
    .venv/bin/python benchmarks/hard_quality.py --quick              # smoke run (a couple of minutes)
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import statistics
import time

import pandas as pd
import torch

from dplib import lm
from dplib.models import load_model
from dplib.optim import HardConfig, SoftConfig, optimize_soft, score_prompt_text
from dplib.optim.hard import HardSearch
from dplib.optim.hard_init import random_prompt
from dplib.targets import Targets, from_model, logits_width, next_token_probs, vanilla

VARIANTS = {
    "v0": dict(init="random", always_move=False, copy_share=0.0, reuse_prefix=False),
    "move": dict(init="random", always_move=True, copy_share=0.0),
    "copy": dict(init="random", always_move=False, copy_share=0.25),
    "random_init": dict(init="random"),
    "default": {},
    "swaps": dict(n_swaps=2, n_swaps_end=1),
    "restart": dict(restart_after=10, buffer_size=8),
    "target_init": dict(init_text=None),
    "soft_init": {},  # set per target set from its soft prompt's projection
}


def word_tokens(tokenizer, n: int, seed: int = 0) -> list[int]:
    """n ordinary word tokens: ' ' + 4-8 lowercase ASCII letters, drawn with a seeded generator."""
    words = [i for tok, i in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
             if re.fullmatch(r"[a-z]{4,8}", tokenizer.decode([i]).removeprefix(" "))
             and tokenizer.decode([i]).startswith(" ")]
    pick = torch.randperm(len(words), generator=torch.Generator().manual_seed(seed))[:n]
    return [words[i] for i in pick.tolist()]


def one_hot(width: int, tokens: list[int], tokenizer) -> Targets:
    probs = torch.zeros(len(tokens), width)
    probs[torch.arange(len(tokens)), torch.tensor(tokens)] = 1.0
    meta = pd.DataFrame({"target_id": [f"token{tokenizer.decode([t])!r}" for t in tokens], "kind": "one_token"})
    return Targets.from_probs(probs, meta=meta)


def planted(model, tokenizer, entropies: list[float], per_entropy: int, L: int, seed: int = 3,
            pool: int = 400) -> Targets:
    """Targets reachable at L: the model's next-token distribution after seeded random prompts of L allowed
    tokens (framed as the search frames its prompts: BOS first), each re-tokenising to itself. Of `pool`
    such prompts, the `per_entropy` whose distributions' entropies lie nearest each of `entropies` (nats;
    random prompts mostly give flat distributions, and flat ones are easy). The planted texts are in
    meta["planted"]."""
    frame = lm.prompt_frame(model, tokenizer)
    allowed = lm.allowed_tokens(tokenizer, logits_width(model)).nonzero().flatten()
    gen = torch.Generator().manual_seed(seed)
    prompts = [random_prompt(tokenizer, frame, allowed, L, True, gen) for _ in range(pool)]
    drawn = Targets.from_probs(next_token_probs(model, [frame.ids(p) for p in prompts]))
    pick: list[int] = []
    for h in entropies:
        pick += [i for i in (drawn.entropy - h).abs().argsort().tolist() if i not in pick][:per_entropy]
    meta = pd.DataFrame({"target_id": [f"planted{i}" for i in pick], "kind": "planted",
                         "planted": [tokenizer.decode(prompts[i]) for i in pick]})
    return Targets.from_probs(drawn.probs[pick], meta=meta)


def target_sets(model, tokenizer, quick: bool, names: list[str], n: int = 8) -> dict[str, tuple[Targets, HardConfig]]:
    """name → (targets, the set's budget as a HardConfig of today's defaults), for the sets named (each is
    built only when asked for: planted and lm run the model). n: targets of the one_token and lm sets."""
    width = logits_width(model)
    n = 2 if quick else n
    x_start = " ".join(["x"] * 10)
    quickstart_budget = HardConfig(prompt_length=5, steps=4 if quick else 40, n_candidates=128, patience=0)
    build = {
        "one_token": lambda: (one_hot(width, word_tokens(tokenizer, n), tokenizer),
                              HardConfig(prompt_length=10, steps=4 if quick else 50, n_candidates=128, top_k=128,
                                         init_text=x_start, ascii_only=True, patience=0)),
        "quickstart": lambda: (vanilla(width, [3.0], seed=0), quickstart_budget),
        "entropy": lambda: (vanilla(width, [1.0, 3.0] if quick else [1.0, 3.0, 5.0, 7.0], seed=1),
                            HardConfig(prompt_length=10, steps=4 if quick else 30, n_candidates=128, patience=0)),
        "notebook": lambda: (vanilla(width, [1.0, 4.0] if quick else [float(h) for h in range(1, 9)], seed=2),
                             HardConfig(prompt_length=5, steps=4 if quick else 20, n_candidates=64, patience=0)),
        "planted": lambda: (planted(model, tokenizer, [1.0, 3.0] if quick else [1.0, 3.0, 5.0, 7.0],
                                    1 if quick else 2, 5), quickstart_budget),
        "lm": lambda: (from_model(model, tokenizer, n, seed=0), quickstart_budget),
    }
    unknown = [name for name in names if name not in build]
    if unknown:
        raise SystemExit(f"unknown set(s) {unknown}; choose among {list(build)}.")
    return {name: build[name]() for name in names}


def run_variant(model, tokenizer, targets: Targets, config: HardConfig) -> dict:
    """Search every target of the set as one batch; KL after each step and the costs."""
    t0, c0 = time.perf_counter(), time.process_time()
    search = HardSearch(model, tokenizer, targets, config)
    per_step = []  # (forward passes per target so far, (T,) best KL so far)
    while not search.done:
        search.step()
        per_step.append((search.n_scored / len(targets), search.best_kl.clone()))
    result = search.result()  # the exact re-scoring of the returned prompts
    return {"per_step": per_step, "kl": result.kl, "wall_s": time.perf_counter() - t0,
            "cpu_s": time.process_time() - c0, "texts": result.prompt_text}


def summary_rows(set_name: str, variant: str, out: dict, T: int, soft_kl: torch.Tensor | None) -> list[dict]:
    n = len(out["per_step"])
    rows = []
    for frac in (0.25, 0.5, 1.0):
        k = max(1, round(frac * n))
        passes, kl = out["per_step"][k - 1]
        if frac == 1.0:
            kl = out["kl"]  # the returned prompts, re-scored
        row = {"set": set_name, "variant": variant, "steps": k, "passes/target": round(passes),
               "mean": float(kl.mean()), "median": float(kl.median()), "worst": float(kl.max())}
        if soft_kl is not None:
            row["gap_to_soft"] = float((kl - soft_kl).mean())
        rows.append(row)
    rows[-1]["wall_s"] = out["wall_s"]
    rows[-1]["cpu_s/target"] = out["cpu_s"] / T
    return rows


def print_table(rows: list[dict]) -> None:
    cols = ["set", "variant", "steps", "passes/target", "mean", "median", "worst", "gap_to_soft", "wall_s",
            "cpu_s/target"]
    print(" | ".join(cols))
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(f"{v:.3f}" if isinstance(v, float) and c in ("mean", "median", "worst", "gap_to_soft")
                         else f"{v:.1f}" if isinstance(v, float) else str(v))
        print(" | ".join(cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short smoke run")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sets", default="one_token,quickstart,entropy,notebook,planted,lm")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--csv", default=None, help="also write the table to this CSV file")
    ap.add_argument("--n-words", type=int, default=8, help="targets of the one_token and lm sets")
    ap.add_argument("--steps", type=int, default=None, help="override every set's steps (a smaller ablation)")
    ap.add_argument("--candidates", type=int, default=None, help="override every set's candidates per step")
    ap.add_argument("--no-soft", action="store_true", help="skip the soft prompts (no hard − soft gap)")
    args = ap.parse_args()

    model, tokenizer = load_model(args.model, device=args.device)
    print(f"# {args.model} on {next(model.parameters()).device} ({torch.get_num_threads()} threads), "
          f"torch {torch.__version__}")
    sets = target_sets(model, tokenizer, args.quick, args.sets.split(","), args.n_words)
    overrides = {k: v for k, v in (("steps", args.steps), ("n_candidates", args.candidates)) if v is not None}
    sets = {name: (t, dataclasses.replace(cfg, **overrides)) for name, (t, cfg) in sets.items()}
    rows = []
    for set_name in args.sets.split(","):
        targets, budget = sets[set_name]
        if set_name == "planted":  # the planted prompts, scored from their text: KL 0 (to float32 rounding)
            kl0, _ = score_prompt_text(model, tokenizer, targets.meta["planted"].tolist(), targets)
            print(f"planted: entropies {[round(float(h), 2) for h in targets.entropy]} nats; the planted prompts "
                  f"{targets.meta['planted'].tolist()} score KL {[round(float(k), 5) for k in kl0]}", flush=True)
        soft = None
        if set_name != "one_token" and not args.no_soft:
            soft_cfg = SoftConfig(prompt_length=budget.prompt_length, steps=20 if args.quick else SoftConfig.steps)
            t = time.perf_counter()
            soft = optimize_soft(model, tokenizer, targets, soft_cfg, progress=False)
            print(f"{set_name}: soft prompt (L = {budget.prompt_length}, {soft_cfg.steps} steps) KL "
                  f"{[round(float(k), 3) for k in soft.kl]} in {time.perf_counter() - t:.0f} s; projections "
                  f"{soft.prompt_text}", flush=True)
        soft_kl = None if soft is None else soft.kl
        for variant in args.variants.split(","):
            if variant == "soft_init":
                if soft is None or None in soft.prompt_text:
                    print(f"{set_name} / soft_init: skipped (no soft prompt, or a projection that does not "
                          "re-tokenise to itself)")
                    continue
                config = dataclasses.replace(budget, init_text=tuple(soft.prompt_text))
            else:
                config = dataclasses.replace(budget, **VARIANTS[variant])
            out = run_variant(model, tokenizer, targets, config)
            new = summary_rows(set_name, variant, out, len(targets), soft_kl)
            rows += new
            print(f"{set_name} / {variant}: KL {[round(float(k), 3) for k in out['kl']]}, "
                  f"{out['wall_s']:.0f} s; texts {out['texts']}", flush=True)
    print()
    print_table(rows)
    if args.csv:
        pd.DataFrame(rows).to_csv(args.csv, index=False)
    print(f"\nmedian wall s per variant: {statistics.median(r['wall_s'] for r in rows if 'wall_s' in r):.0f}")


if __name__ == "__main__":
    main()

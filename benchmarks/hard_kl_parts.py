"""Where does a hard prompt's KL come from? KL(target ‖ model) split by the target's rank bands.

KL(p ‖ q) = Σ_v p_v log(p_v / q_v) is a sum over tokens, so it splits exactly over any partition of
the vocabulary. This splits it by the target's own ranks (its 5 most probable tokens, the next 15, and
so on) and prints, per band, the target's mass, the model's mass and the band's part of the KL: a
prompt can fail by missing the head (the few tokens with most of the mass) or by missing the tail.

It then asks what copying could buy at best. LMs copy tokens from their prompt, and the search proposes
the target's own tokens (`HardConfig.copy_share`, `init="target"`), so a prompt of L tokens can name at
most L of the target's tokens. "copy oracle k" is the KL if the model gave each of the target's top k
tokens exactly its target probability and spread the rest of its mass as this prompt does (q rescaled
on the other tokens): an idealisation of a prompt that names and copies k tokens perfectly, not a bound.
If even the oracle for the tokens a prompt can name stays above a goal, naming tokens cannot reach it;
if it is far below, the obstacle is how much the model copies, not which tokens are named.

Every KL is computed from the prompt's text through the model's own forward (`score_prompt_text`).
By default the prompts are the one the default search finds for the quickstart's target (vanilla,
H = 3 nats, seed 0; L = 5, 40 steps x 128 candidates, about 80 s on 2 quiet cores), found first in the
same run, and the search's start (the target's L most probable tokens, `init="target"`).

    .venv/bin/python benchmarks/hard_kl_parts.py
    .venv/bin/python benchmarks/hard_kl_parts.py --text ": stere breath negotiation or" --text " stere breath"
"""

from __future__ import annotations

import argparse
from itertools import pairwise

import quickstart_prompt
import torch

from dplib.optim.hard import HardSearch
from dplib.optim.scoring import score_prompt_text

BANDS = (0, 5, 20, 100, 1000)  # rank band edges (0-based, exclusive ends); the last band runs to the vocabulary's end


def kl_parts(p: torch.Tensor, logq: torch.Tensor) -> list[tuple[str, float, float, float]]:
    """p (V,) target probabilities, logq (V,) model log-probabilities → per rank band of p:
    (band, target mass, model mass, the band's part of KL(p ‖ q) in nats). The parts sum to the KL."""
    p, logq = p.double(), logq.double()
    order = p.argsort(descending=True)
    part = torch.where(p > 0, p * (p.clamp_min(1e-300).log() - logq), torch.zeros_like(p))
    edges = [*BANDS, len(p)]
    rows = []
    for a, b in pairwise(edges):
        idx = order[a:b]
        rows.append((f"{a + 1}-{b}", float(p[idx].sum()), float(logq[idx].exp().sum()), float(part[idx].sum())))
    return rows


def copy_oracle(p: torch.Tensor, logq: torch.Tensor, k: int) -> float:
    """KL(p ‖ q_k) in nats, where q_k = p on the target's top k tokens and q rescaled to 1 − (their
    target mass) on every other token: what copying k named tokens perfectly would leave."""
    p, q = p.double(), logq.double().exp()
    named = p.argsort(descending=True)[:k]
    rest = torch.ones_like(p, dtype=torch.bool)
    rest[named] = False
    qk = torch.empty_like(q)
    qk[named] = p[named]
    qk[rest] = q[rest] / q[rest].sum() * (1 - p[named].sum())
    keep = p > 0
    return float((p[keep] * (p[keep].log() - qk[keep].log())).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    quickstart_prompt.add_arguments(ap)
    ap.add_argument("--text", action="append", default=None,
                    help="a prompt text to split (repeat for several; default: search for one first)")
    args = ap.parse_args()

    model, tokenizer, targets = quickstart_prompt.load(args)
    texts = args.text
    if texts is None:
        config = quickstart_prompt.search_config(args)
        start = HardSearch(model, tokenizer, targets, config)  # its initial prompt: the target's top tokens
        texts = [quickstart_prompt.found_prompt(model, tokenizer, targets, config),
                 tokenizer.decode(start.current[0].tolist())]

    p = targets.probs[0]
    top = p.double().argsort(descending=True)[:8]
    print(f"target: vanilla, H = {args.entropy} nats, seed {args.seed}; its top tokens "
          f"{[tokenizer.decode([int(i)]) for i in top]}")
    for text in texts:
        kl, logq = score_prompt_text(model, tokenizer, [text], targets)
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        print(f"\nprompt {text!r} ({n} tokens): KL {float(kl[0]):.4f}")
        print("target ranks | target mass | model mass | KL part")
        for band, pm, qm, part in kl_parts(p, logq[0]):
            print(f"{band} | {pm:.3f} | {qm:.4f} | {part:.3f}")
        print("copy oracle: " + ", ".join(f"k = {k}: {copy_oracle(p, logq[0], k):.3f}" for k in range(1, n + 1)))


if __name__ == "__main__":
    main()

"""Is a hard prompt a local optimum of *every* one-token swap? Score its whole single-swap neighbourhood.

The search (`optim.hard`) changes one token per move, but it only scores the swaps its proposals reach
(the gradient's top-k per position, and the target's own tokens). This scores all of them: for each
position i of the prompt, every allowed token at i (the rest unchanged, about 49k candidates per
position on SmolLM2), each after the shared key/value cache of the prefix and the tokens before i, as
the search scores its candidates. A candidate counts only if its text re-tokenises to its ids, as in the
search. Per position it reports the best swap's KL, its token, and that token's rank in the search's
gradient ranking at the prompt (whether `top_k` would have proposed it); the best swap found is then
re-scored from its text through the model's own forward (`score_prompt_text`).

If no position's best swap is much below the prompt's KL, no choice of single-swap proposals can take
the search further from there: the limit is the neighbourhood, not how it is sampled.

By default the prompt is the one the default search finds for the quickstart's target (vanilla, H = 3
nats, seed 0; L = 5, 40 steps x 128 candidates), found first in the same run. The cost per position
grows with the tokens it runs: on 2 quiet CPU cores, for L = 5, from about 3 min for the last position
to 10 min for the first, 32 min for all five.

    .venv/bin/python benchmarks/hard_neighbourhood.py                       # search, then every position
    .venv/bin/python benchmarks/hard_neighbourhood.py --positions 4,3       # the last two only
    .venv/bin/python benchmarks/hard_neighbourhood.py --text ": stere breath negotiation or" --positions 4
    .venv/bin/python benchmarks/hard_neighbourhood.py --quick               # smoke run (a minute)
"""

from __future__ import annotations

import argparse
import math
import time

import quickstart_prompt
import torch

from dplib.lm import allowed_tokens
from dplib.optim import HardConfig
from dplib.optim.hard import HardSearch, _token_gradient
from dplib.optim.scoring import score_prompt_text
from dplib.targets import logits_width


def gradient_ranks(search: HardSearch) -> torch.Tensor:
    """(L, vocab) each token's rank (0 = first) in the search's gradient ranking at its current prompt."""
    ids = search.current[:1].to(search.device)
    g, _ = _token_gradient(search.model, search.head, (search.prefix_ids, search.suffix_ids), ids,
                           search.target_probs[:1], search.neg_entropy[:1], search.emb_weight, search.emb_scale)
    g = g[0].masked_fill(search.disallowed, math.inf)
    g.scatter_(1, ids[0].unsqueeze(-1), math.inf)  # as in the search: a swap must change the token
    return g.argsort(dim=1).argsort(dim=1).cpu()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    quickstart_prompt.add_arguments(ap)
    ap.add_argument("--text", default=None, help="scan this prompt text (default: search for one first)")
    ap.add_argument("--positions", default=None, help="comma-separated positions (default: all, last first)")
    ap.add_argument("--quick", action="store_true", help="smoke run: a short search, 2,000 tokens per position")
    args = ap.parse_args()

    model, tokenizer, targets = quickstart_prompt.load(args)
    text = args.text
    if text is None:
        config = quickstart_prompt.search_config(args, steps=4 if args.quick else None)
        text = quickstart_prompt.found_prompt(model, tokenizer, targets, config)

    search = HardSearch(model, tokenizer, targets, HardConfig(prompt_length=None, init_text=text, steps=1))
    kl0, L = float(search.initial_kl[0]), search.config.prompt_length
    ranks = gradient_ranks(search)
    allowed = allowed_tokens(tokenizer, logits_width(model)).nonzero().flatten()
    if args.quick:
        allowed = allowed[:2000]
    positions = (list(range(L - 1, -1, -1)) if args.positions is None
                 else [int(p) for p in args.positions.split(",")])
    print(f"prompt {text!r}: KL {kl0:.4f}, {L} tokens; {len(allowed)} allowed tokens per position\n")
    print("position | token now | swaps | re-tokenise (scored) | best swap | its KL | KL change | gradient rank")
    best_text, best_kl = text, kl0
    for i in positions:
        t = time.perf_counter()
        cands = search.current[0].repeat(len(allowed), 1)
        cands[:, i] = allowed
        cands = cands[cands[:, i] != search.current[0, i]]  # the prompt itself is not a swap
        ok = torch.tensor(search.frame.text_reproduces(cands.tolist())[0], dtype=torch.bool)
        cands = cands[ok]
        kl, _ = search.score(cands, torch.zeros(len(cands), dtype=torch.long, device=search.device),
                             torch.full((len(cands),), i, device=search.device))
        kl = kl.cpu()
        j = int(kl.argmin())
        token = int(cands[j, i])
        print(f"{i} | {tokenizer.decode([int(search.current[0, i])])!r} | {len(ok)} | {int(ok.sum())} | "
              f"{tokenizer.decode([token])!r} | {float(kl[j]):.4f} | {float(kl[j]) - kl0:+.4f} | "
              f"{int(ranks[i, token])} ({time.perf_counter() - t:.0f} s)", flush=True)
        if float(kl[j]) < best_kl:
            best_kl, best_text = float(kl[j]), tokenizer.decode(cands[j].tolist())
    exact, _ = score_prompt_text(model, tokenizer, [best_text], targets)
    print(f"\nbest single swap: {best_text!r}, KL {best_kl:.4f} (from its text, whole forward: "
          f"{float(exact[0]):.4f}); the prompt's own KL {kl0:.4f}")


if __name__ == "__main__":
    main()

"""How fast is the hard-prompt search? Candidate scoring and whole steps on smollm2-135m.

Measures, in one run (so the ratios are fair on a noisy machine):
  1. the machine's fp32 matmul peak (a big square float32 matmul), GFLOP/s;
  2. candidates scored per second at L = 10 (BOS + 10 tokens) for B in {64, 256, 512}:
       - "last": the optimiser's path (body, last position only, 2-D head matmul, float32 KL);
       - "full": the same batch through `model(input_ids).logits` (full-sequence head), last row kept;
       - "one":  candidates scored one at a time with full logits (universal triggers / AutoPrompt);
     with achieved GFLOP/s (useful FLOPs: body at every position + head at the last one) as a
     fraction of the peak;
  3. one whole hard step (gradient + sampling/filter + scoring) for T in {1, 8, 32} targets;
  4. prefix key/value reuse: candidates/s of the search's scoring (`HardSearch.score`, B = 256, L = 10)
     with the fixed prefix run once per batch and its cache shared, against whole sequences, for a
     1-token prefix (BOS) and a 20-token one (20 tokens of literal prefix text);
  5. shared prompt tokens: one real step's candidates (B = 128 per target), each scored after the cache
     of the prefix and the prompt tokens before its first swap, against whole sequences, at L = 5 and 10
     for T = 1 and 8 targets.
Issue #5 asks, at B = 256: "last" ≥ 70 % of peak and ≥ 4× the one-at-a-time rate; issue #17 asks
for ≥ 1.5× candidates/s from prefix reuse with a 20-token prefix.

    .venv/bin/python benchmarks/hard_step.py            # full run (several minutes on 2 cores)
    .venv/bin/python benchmarks/hard_step.py --quick    # smoke run (about a minute)
    .venv/bin/python benchmarks/hard_step.py --prefix-only   # sections 4 and 5 alone
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dplib.lm import allowed_tokens, output_layer
from dplib.models import load_model
from dplib.optim.hard import HardConfig, HardSearch
from dplib.optim.scoring import Chunker, score_kl
from dplib.targets import Targets, logits_width


def median_time(fn, repeats: int) -> float:
    return median_times([fn], repeats)[0]


def median_times(fns, repeats: int) -> list[float]:
    """Median seconds of each function, timed interleaved (a, b, a, b, ...) after one warm-up each,
    so that load changes on a shared machine hit all of them alike."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times, strict=True):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return [statistics.median(ts) for ts in times]


def matmul_peak(n: int, repeats: int) -> float:
    """fp32 GFLOP/s of an (n × n) @ (n × n) matmul."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / median_time(lambda: a @ b, repeats) / 1e9


def flops_per_candidate(model, seq: int, full_head: bool = False) -> float:
    """Forward FLOPs of one sequence of `seq` tokens: 2·params per token in the body's matmuls,
    attention scores and mixing, and the head at the last position (or every position)."""
    cfg = model.config
    emb = model.get_input_embeddings().weight
    body_params = sum(p.numel() for n, p in model.model.named_parameters()
                      if p.ndim == 2 and p.data_ptr() != emb.data_ptr())
    attn = 4 * cfg.num_hidden_layers * seq * seq * cfg.num_attention_heads * (cfg.hidden_size // cfg.num_attention_heads)
    head = 2 * emb.shape[0] * emb.shape[1] * (seq if full_head else 1)
    return 2 * body_params * seq + attn + head


def random_targets(model, T: int, seed: int = 0) -> Targets:
    width = logits_width(model)
    g = torch.Generator().manual_seed(seed)
    return Targets.from_probs(torch.softmax(torch.randn(T, width, generator=g) * 3, -1))


PREFIX_TEXT = ("You are a careful assistant. Read the instruction and answer with a single word"
               " only, nothing else at all")


def prefix_reuse(model, tokenizer, L: int, b: int, repeats: int, sync) -> None:
    """Candidates/s of HardSearch.score with and without the shared prefix cache, 1- and 20-token prefixes."""
    text_ids = tokenizer.encode(PREFIX_TEXT, add_special_tokens=False)
    prefix20 = tokenizer.decode(text_ids[:20])  # literal prefix text: no BOS, 20 tokens
    print(f"\nprefix key/value reuse, B = {b} candidates, L = {L} (+ the prefix)")
    print(f"{'prefix tokens':>13} {'whole cand/s':>13} {'reuse cand/s':>13} {'reuse/whole':>12} {'max |ΔKL|':>10}")
    targets = random_targets(model, 1)
    for prefix in ("bos", prefix20):
        search = HardSearch(model, tokenizer, targets, HardConfig(prompt_length=L, steps=1, prefix=prefix))
        g = torch.Generator().manual_seed(1)
        allowed = allowed_tokens(tokenizer, logits_width(model)).nonzero().flatten()
        prompts = allowed[torch.randint(len(allowed), (b, L), generator=g)]
        owner = torch.zeros(b, dtype=torch.long, device=search.device)
        kls = {}

        def timed(reuse: bool, search=search, prompts=prompts, owner=owner, kls=kls):
            search.reuse = reuse
            kls[reuse] = search.score(prompts, owner)[0].cpu()
            sync()

        t_whole, t_reuse = median_times([lambda timed=timed: timed(False), lambda timed=timed: timed(True)], repeats)
        gap = float((kls[True] - kls[False]).abs().max())
        print(f"{len(search.prefix_ids):>13} {b / t_whole:>13.1f} {b / t_reuse:>13.1f} {t_whole / t_reuse:>12.2f} "
              f"{gap:>10.1e}")


def shared_reuse(model, tokenizer, b: int, repeats: int, sync) -> None:
    """Candidates/s of HardSearch.score on one step's real candidates (each sharing the prompt tokens before
    its first swap with its target's prompt), with the shared cache and as whole sequences."""
    print(f"\nshared prompt tokens: one step's candidates (B = {b} per target, BOS prefix), scored after the cache "
          "of what each shares with its prompt vs whole sequences")
    print(f"{'L':>3} {'T':>3} {'cands':>6} {'whole cand/s':>13} {'shared cand/s':>14} {'shared/whole':>13} "
          f"{'max |ΔKL|':>10}")
    for L, T in ((5, 1), (5, 8), (10, 1), (10, 8)):
        search = HardSearch(model, tokenizer, random_targets(model, T, seed=T),
                            HardConfig(prompt_length=L, steps=1, n_candidates=b))
        active = torch.arange(T)
        ids, owner, start = search.candidates(active, search.top_tokens(active))
        owner, start = owner.to(search.device), start.to(search.device)
        kls = {}

        def timed(reuse: bool, search=search, ids=ids, owner=owner, start=start, kls=kls):
            search.reuse = reuse
            kls[reuse] = search.score(ids, owner, start)[0].cpu()
            sync()

        t_whole, t_reuse = median_times([lambda timed=timed: timed(False), lambda timed=timed: timed(True)], repeats)
        gap = float((kls[True] - kls[False]).abs().max())
        print(f"{L:>3} {T:>3} {len(ids):>6} {len(ids) / t_whole:>13.1f} {len(ids) / t_reuse:>14.1f} "
              f"{t_whole / t_reuse:>13.2f} {gap:>10.1e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short smoke run")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--step-b", type=int, default=64, help="candidates per target in the whole-step timing")
    ap.add_argument("--prefix-only", action="store_true", help="only sections 4 and 5, key/value reuse")
    args = ap.parse_args()

    L = 10
    repeats = 2 if args.quick else 5
    bs = [64, 256] if args.quick else [64, 256, 512]
    ts = [1, 4] if args.quick else [1, 8, 32]
    n_one = 16 if args.quick else 48

    model, tokenizer = load_model(args.model, device=args.device)
    device = next(model.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    width = logits_width(model)
    head = output_layer(model)
    allowed = allowed_tokens(tokenizer, width).nonzero().flatten()
    g = torch.Generator().manual_seed(0)
    bos = tokenizer.bos_token_id
    seq = L + (bos is not None)

    def batch(n: int) -> torch.Tensor:
        ids = allowed[torch.randint(len(allowed), (n, L), generator=g)]
        if bos is not None:
            ids = torch.cat([torch.full((n, 1), bos), ids], dim=1)
        return ids.to(device)

    if args.prefix_only:
        prefix_reuse(model, tokenizer, L, 64 if args.quick else 256, repeats, sync)
        shared_reuse(model, tokenizer, 32 if args.quick else 128, repeats, sync)
        return
    peak = matmul_peak(4096 if device.type == "cuda" else 2048, repeats + 2)
    print(f"# {args.model} on {device} ({torch.get_num_threads()} threads), L = {L} (+BOS), "
          f"torch {torch.__version__}")
    print(f"fp32 matmul peak: {peak:.1f} GFLOP/s")

    fl_last = flops_per_candidate(model, seq)
    fl_full = flops_per_candidate(model, seq, full_head=True)
    print(f"FLOPs per candidate: {fl_last / 1e6:.0f} M (last-position head), {fl_full / 1e6:.0f} M (full head)")

    targets = random_targets(model, 1)
    p = targets.probs.to(device, torch.float32)
    neg_ent = torch.special.xlogy(p, p).sum(-1)

    def score_last(ids):
        score_kl(model, head, ids, torch.zeros(len(ids), dtype=torch.long, device=device), p, neg_ent,
               Chunker(len(ids), "candidate"))
        sync()

    def score_full(ids):
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[:, -1].float(), -1)
            (neg_ent - (p * logprobs).sum(-1)).cpu()
        sync()

    def score_one(ids):
        for i in range(len(ids)):
            score_full(ids[i:i + 1])

    one_ids = batch(n_one)
    rate_one = n_one / median_time(lambda: score_one(one_ids), repeats)
    print(f"\none at a time (full logits): {rate_one:.1f} candidates/s")
    print(f"{'B':>5} {'last cand/s':>12} {'full cand/s':>12} {'last/full':>10} {'last/one':>9} "
          f"{'GFLOP/s':>8} {'% peak':>7}")
    for b in bs:
        ids = batch(b)
        t_last, t_full = median_times([lambda ids=ids: score_last(ids), lambda ids=ids: score_full(ids)],
                                      repeats)
        r_last, r_full = b / t_last, b / t_full
        gflops = r_last * fl_last / 1e9
        print(f"{b:>5} {r_last:>12.1f} {r_full:>12.1f} {r_last / r_full:>10.2f} {r_last / rate_one:>9.2f} "
              f"{gflops:>8.1f} {100 * gflops / peak:>6.1f}%")

    prefix_reuse(model, tokenizer, L, 64 if args.quick else 256, repeats, sync)

    step_repeats = 1 if args.quick else 2  # a T = 32 step scores 2048 candidates: ~30 s on 2 cores
    print(f"\nwhole hard step, B = {args.step_b} candidates per target, top_k = 256 (steps timed: {step_repeats})")
    print(f"{'T':>4} {'step s':>8} {'gradient s':>11} {'sample s':>9} {'score s':>8} {'cand/s':>8}")
    for T in ts:
        cfg = HardConfig(prompt_length=L, steps=step_repeats + 1, n_candidates=args.step_b, patience=0,
                         candidate_batch=512)
        search = HardSearch(model, tokenizer, random_targets(model, T, seed=T), cfg)
        search.step()  # warm-up
        search.timings = dict.fromkeys(search.timings, 0.0)
        n0 = search.n_scored
        t = time.perf_counter()
        for _ in range(step_repeats):
            search.step()
        sync()
        wall = (time.perf_counter() - t) / step_repeats
        tm = {k: v / step_repeats for k, v in search.timings.items()}
        cand = (search.n_scored - n0) / step_repeats
        print(f"{T:>4} {wall:>8.2f} {tm['gradient']:>11.2f} {tm['sample']:>9.2f} {tm['score']:>8.2f} "
              f"{cand / wall:>8.1f}")


if __name__ == "__main__":
    main()

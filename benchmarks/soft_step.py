"""Soft-prompt step throughput on smollm2-135m, against the naive loop measured in the same run.

Prints, for T targets in {1, 8, 32, 64} and prompt lengths L in {1, 5, 10}:
  target-steps/s of `optimize_soft` (T prompts optimised as one batch, last-position 2-D head),
  the ratio to the naive loop (T = 1, full-sequence logits via model(inputs_embeds=...).logits),
  and achieved GFLOP/s against this machine's float32 matmul peak, timed here too.
Then the wall time of `free_bound` and `norm_bound` for 64 vanilla targets over a spread of entropies.

FLOPs per target-step = 2 × (forward), forward = 2·n_body_params·n_positions + 2·vocab·d (head, last
position only); the backward pass with frozen weights costs about one forward (docs/performance.md).

    .venv/bin/python benchmarks/soft_step.py            # full run (~10 min on the 2-core CPU)
    .venv/bin/python benchmarks/soft_step.py --quick    # smoke run (~1-2 min)

Performance targets (issue 4): L = 5, T = 64: ≥ 7× naive and ≥ 70 % of peak; free_bound 64 targets < 60 s.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from dplib import load_model
from dplib import targets as tg
from dplib.lm import body, bos_id, kl_from_logprobs
from dplib.optim import BoundConfig, SoftConfig, free_bound, norm_bound, optimize_soft


def matmul_peak(n: int = 2048, reps: int = 5) -> float:
    """float32 GFLOP/s of an n×n @ n×n matmul (best of `reps`)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def flops_per_target_step(model, n_positions: int) -> float:
    d = model.config.hidden_size
    n_body = sum(p.numel() for p in body(model).layers.parameters())
    vocab = model.get_output_embeddings().weight.shape[0]
    return 2 * (2 * n_body * n_positions + 2 * vocab * d)


def naive_steps_per_s(model, tok, target: torch.Tensor, length: int, steps: int) -> float:
    """The loop every optimiser would write first: T = 1, full-sequence logits, then the last row."""
    emb = model.get_input_embeddings()
    prefix = emb(torch.tensor([[bos_id(tok)]]))
    prompt = emb(torch.randint(1000, 20000, (1, length))).detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([prompt], lr=0.03)

    def step():
        logits = model(inputs_embeds=torch.cat([prefix, prompt], dim=1)).logits
        loss = kl_from_logprobs(target, logits[:, -1].float().log_softmax(-1)).sum()
        loss.backward()
        opt.step()
        opt.zero_grad()

    step()  # warm-up
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - t)


def batched_target_steps_per_s(model, tok, targets, length: int, steps: int) -> float:
    config = SoftConfig(prompt_length=length, steps=steps, project=False, max_batch=0)
    optimize_soft(model, tok, targets, SoftConfig(prompt_length=length, steps=1, project=False, max_batch=0),
                  progress=False)  # warm-up
    base = optimize_soft(model, tok, targets, SoftConfig(prompt_length=length, steps=0, project=False,
                                                         max_batch=0), progress=False).wall_s
    wall = optimize_soft(model, tok, targets, config, progress=False).wall_s
    return len(targets) * steps / max(wall - base, 1e-9)  # setup and the final scoring pass excluded


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--only", choices=["soft", "bounds"], default=None, help="run one half of the benchmark")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [1, 8] if args.quick else [1, 8, 32, 64]
    lengths = [1, 5] if args.quick else [1, 5, 10]
    steps = 3 if args.quick else 10
    n_bound = 8 if args.quick else 64

    model, tok = load_model("smollm2-135m", device="cpu")
    width = tg.logits_width(model)
    peak = matmul_peak()
    print(f"threads {torch.get_num_threads()}; float32 matmul peak {peak:.1f} GFLOP/s")
    vanilla = tg.vanilla(width, torch.linspace(0.5, 10.0, max(sizes)).tolist(), seed=0)

    if args.only != "bounds":
        soft_table(model, tok, vanilla, lengths, sizes, steps, peak)
    if args.only != "soft":
        bound_times(model, tok, width, n_bound)


def soft_table(model, tok, vanilla, lengths, sizes, steps, peak):
    """Target-steps/s per (L, T), as ratios against the naive loop and as a share of the matmul peak."""
    print(f"{'L':>3} {'T':>3} {'target-steps/s':>15} {'x naive':>8} {'GFLOP/s':>8} {'% peak':>7}")
    for length in lengths:
        naive = naive_steps_per_s(model, tok, vanilla.probs[:1], length, steps)
        flops = flops_per_target_step(model, length + 1)
        print(f"{length:>3} {'naive':>3} {naive:>15.2f} {1.0:>8.2f} {naive * flops / 1e9:>8.1f} "
              f"{100 * naive * flops / 1e9 / peak:>6.1f}%")
        for n in sizes:
            rate = batched_target_steps_per_s(model, tok, vanilla[list(range(n))], length, steps)
            print(f"{length:>3} {n:>3} {rate:>15.2f} {rate / naive:>8.2f} {rate * flops / 1e9:>8.1f} "
                  f"{100 * rate * flops / 1e9 / peak:>6.1f}%", flush=True)


def bound_times(model, tok, width, n_bound):
    """Wall time of free_bound and norm_bound for n_bound vanilla targets, entropies 0.5-10 nats."""
    bound_targets = tg.vanilla(width, torch.linspace(0.5, 10.0, n_bound).tolist(), seed=1)
    for name, fn in [("free_bound", free_bound), ("norm_bound", norm_bound)]:
        r = fn(model, tok, bound_targets, BoundConfig(), progress=False)
        conv = sum(r.meta["converged"])
        print(f"{name}: {n_bound} targets in {r.wall_s:.1f} s; converged (‖∇‖ ≤ 1e-6) {conv}/{n_bound}; "
              f"solver iterations max {int(r.steps.max())}", flush=True)


if __name__ == "__main__":
    main()

"""How long targets take to build, and how much mass the cross-tokenizer mapping loses.

Run: .venv/bin/python benchmarks/targets_build.py [--n 256] [--lm 32]
Prints: time for n vanilla targets at |V| = 262,144 (Gemma's width) with each method, over an
evenly spaced entropy grid (both ends included); the smollm2-135m <-> gemma3-270m vocabulary map
built cold (an empty temporary cache), loaded from the disk cache (new in-memory state) and from
the in-memory cache; and mass_lost (mean / median / max) when `--lm` from_model targets of each
model are mapped onto the other's vocabulary. One run each: expect ±10 % noise on this machine.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from dplib import targets as T
from dplib.models import load_model


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256, help="vanilla targets per method")
    parser.add_argument("--lm", type=int, default=32, help="from_model targets per direction")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    width = 262_144
    grid = T.entropy_grid(width, args.n)
    for method in T.VANILLA_METHODS:
        t, wall = timed(T.vanilla, width, grid, method=method)
        err = (t.entropy - grid).abs().max().item()
        extra = ""
        if method == "gradient":
            steps = t.meta["gd_steps_taken"]
            extra = f", descent steps mean {steps.mean():.0f} max {steps.max()}"
        print(f"vanilla {method:11s} {args.n} x {width}: {wall:7.1f} s, max |H - h| {err:.2e}, "
              f"stored {t.probs.dtype}{extra}")
        del t

    smol, smol_tok = load_model("smollm2-135m", device="cpu")
    gemma, gemma_tok = load_model("gemma3-270m", device="cpu")
    pairs = {"smollm2->gemma3": (smol, smol_tok, gemma, gemma_tok),
             "gemma3->smollm2": (gemma, gemma_tok, smol, smol_tok)}
    with tempfile.TemporaryDirectory() as cache:
        os.environ["DPLIB_CACHE"] = cache
        for name, (src, src_tok, dst, dst_tok) in pairs.items():
            kw = dict(source_width=T.logits_width(src), target_vocab_size=T.logits_width(dst))
            for tok in (src_tok, dst_tok):
                vars(tok).pop("_dplib_fingerprint", None)
            T._MAPS.clear()
            vmap, cold = timed(T.vocab_map, src_tok, dst_tok, **kw)
            for tok in (src_tok, dst_tok):
                vars(tok).pop("_dplib_fingerprint", None)
            T._MAPS.clear()
            _, disk = timed(T.vocab_map, src_tok, dst_tok, **kw)
            _, memory = timed(T.vocab_map, src_tok, dst_tok, **kw)
            placed = int((vmap.dest >= 0).sum())
            print(f"map {name}: cold {cold:.2f} s, disk cache {disk:.2f} s, memory cache {memory * 1e3:.2f} ms; "
                  f"{placed} / {vmap.source_width} source tokens placed")

        for name, (src, src_tok, dst, dst_tok) in pairs.items():
            lm, wall = timed(T.from_model, src, src_tok, args.lm, seed=0)
            for method in T.MAP_METHODS:
                mapped = T.map_vocab(lm, src_tok, dst_tok, T.logits_width(dst), method=method)
                lost = mapped.meta["mass_lost"]
                print(f"mass_lost {name} ({method}, {args.lm} from_model targets built in {wall:.1f} s): "
                      f"mean {lost.mean():.4f}, median {lost.median():.4f}, max {lost.max():.4f}")


if __name__ == "__main__":
    main()

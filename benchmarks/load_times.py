"""Cold and warm `load_model` times for the embedded models, each in a fresh process.

Cold: an empty cache directory (GGUF de-quantisation + tokenizer conversion + writing the copy).
Warm: the same cache again (manifest check + safetensors load).

    .venv/bin/python benchmarks/load_times.py [--models smollm2-135m gemma3-270m] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

CODE = """
import time, json
t = time.perf_counter()
import dplib
m, tok = dplib.load_model({name!r}, device="cpu")
print(json.dumps({{"s": time.perf_counter() - t, "hit": m.dplib_source["cache_hit"]}}))
"""


def load_once(name: str, cache: str) -> tuple[float, bool]:
    import json

    env = dict(os.environ, DPLIB_CACHE=cache, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    out = subprocess.run([sys.executable, "-c", CODE.format(name=name)], env=env, check=True,
                         capture_output=True, text=True)
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    return rec["s"], rec["hit"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"{'model':<14} {'cold_s':>8} {f'warm_s (median of {args.repeats})':>24}  (fresh process each; import included)")
    for name in args.models:
        with tempfile.TemporaryDirectory() as cache:
            cold, hit = load_once(name, cache)
            assert not hit
            warm = [load_once(name, cache) for _ in range(args.repeats)]
            assert all(h for _, h in warm)
        print(f"{name:<14} {cold:8.1f} {statistics.median(s for s, _ in warm):24.2f}")


if __name__ == "__main__":
    main()

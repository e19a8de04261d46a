"""Seeds: one generator per piece of randomness, derived from names rather than from order.

`derive_seed(base, "target-id", "soft")` hashes its parts, so the seed of a sweep cell depends on
(base seed, target id, method) only: sub-setting or reordering a sweep changes no result.
`generator(seed)` gives the `torch.Generator` that a sampler or optimiser draws from explicitly;
dplib leaves the global random state as it finds it.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(base: int, *parts: object) -> int:
    """A 63-bit seed that is a pure function of `base` and the string forms of `parts`."""
    text = "\x1f".join([str(int(base)), *map(str, parts)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A fresh `torch.Generator` on `device` seeded with `seed` (global state untouched)."""
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g

"""Token ids a real prompt may not (`special_ids`) or may (`allowed_tokens`) use."""

from __future__ import annotations

import torch
from torch import Tensor


def special_ids(tokenizer) -> set[int]:
    """Ids of every special token: BOS, EOS, PAD, chat markers, every added token marked special."""
    ids = set(tokenizer.all_special_ids)
    ids |= {int(i) for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special}
    return ids


def allowed_tokens(tokenizer, width: int, *, ascii_only: bool = False) -> Tensor:
    """(width,) bool mask of the token ids a real prompt may use.

    Excluded always: special tokens and the padding rows beyond `len(tokenizer)` (they have
    embeddings but no string). With `ascii_only`, tokens whose decoded text is empty or not
    printable ASCII are excluded too.
    """
    n = min(len(tokenizer), width)
    mask = torch.zeros(width, dtype=torch.bool)
    mask[:n] = True
    mask[[i for i in special_ids(tokenizer) if 0 <= i < width]] = False
    if ascii_only:
        for i in range(n):
            if mask[i]:
                text = tokenizer.decode([i])
                mask[i] = bool(text) and text.isascii() and text.isprintable()
    return mask

"""LM targets: a model's own next-token distributions, on a corpus (`from_model`) or after given
contexts (`reference`, for which a KL-0 prompt exists).

These keep whatever mass the model puts on its padding rows (beyond `len(tokenizer)`), because
they must stay the model's own distributions.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor

from .. import lm
from ..lm import logits_width
from ..seeds import derive_seed, generator
from .batch import TargetError, Targets


def _source_name(model) -> str | None:
    return (getattr(model, "dplib_source", None) or {}).get("name")


@torch.no_grad()
def next_token_probs(model, sequences: Sequence[Sequence[int]], *, batch_size: int = 16) -> Tensor:
    """The model's next-token distribution after each token sequence; (n, logits width) float32.

    Sequences are batched only with others of the same length (up to `batch_size` per forward pass),
    so no padding is ever fed: each row is exactly its own forward pass, for every architecture
    (padding needs position ids and masks that not every family takes). Only the last position
    reaches the LM head (`lm.next_token_logprobs`).
    """
    if any(len(s) == 0 for s in sequences):
        raise TargetError("a context is empty; every context needs at least one token (e.g. the BOS token).")
    seqs = [list(map(int, s)) for s in sequences]
    longest = max(map(len, seqs), default=0)
    lm.check_length(model, longest, "a context")
    lm.check(model)
    device = next(model.parameters()).device
    head = lm.output_layer(model)
    out = torch.empty(len(seqs), logits_width(model), dtype=torch.float32)
    by_length: dict[int, list[int]] = {}
    for i, s in enumerate(seqs):
        by_length.setdefault(len(s), []).append(i)
    for rows in by_length.values():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            ids = torch.tensor([seqs[i] for i in chunk], device=device)
            logprobs = lm.next_token_logprobs(model, lm.embed(model, ids), head=head).double()
            probs = torch.exp(logprobs)
            out[chunk] = (probs / probs.sum(-1, keepdim=True)).float().cpu()
    return out


def _corpus_documents(corpus) -> tuple[list[str], list[str]]:
    """(names, texts) of the corpus: None → pydoc_data.topics; a path → that file; a list → its strings."""
    if corpus is None:
        from pydoc_data.topics import topics  # Python's own documentation, shipped with the stdlib

        names = sorted(topics)
        return names, [topics[n] for n in names]
    if isinstance(corpus, (str, os.PathLike)):
        path = Path(corpus).expanduser()
        if not path.is_file():
            raise TargetError(f"corpus {str(corpus)!r} is not a file; pass a path to a UTF-8 text file, "
                              "or a list of strings for literal text.")
        return [path.name], [path.read_text(encoding="utf-8")]
    texts = list(corpus)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise TargetError("corpus must be None (Python's docs), a path to a text file, or a non-empty list of strings.")
    return [f"doc{i}" for i in range(len(texts))], texts


def from_model(model, tokenizer, n: int, *, corpus=None, seed: int = 0, sample: bool = False,
               context_tokens: tuple[int, int] = (8, 64), prefix: str = "bos", batch_size: int = 16) -> Targets:
    """The source model's next-token distributions at n seeded positions of a corpus.

    Args:
        model, tokenizer: the source LM (its logits width is the targets' width).
        n: number of targets.
        corpus: None for the English prose of Python's documentation (`pydoc_data.topics`, read at
            run time), a path to a UTF-8 text file, or a list of strings.
        seed: target i's context length and position come from derive_seed(seed, "lm", i), so
            they depend on (seed, i) only; with `sample=True` the text is sampled with
            derive_seed(seed, "lm-sample").
        sample: contexts are text sampled from the model itself (special tokens and padding rows
            excluded), starting from the prompt frame's prefix (else the EOS token).
        context_tokens: (min, max) context length in tokens, both inclusive, drawn uniformly.
        prefix: the prompt frame's prefix (`lm.prompt_frame`): "bos" = the tokenizer's BOS token,
            "" = none, other text = that text. The same frame the optimisers put before a prompt.
        batch_size: contexts per forward pass.

    A context is a window of the tokenised document preceded by the frame's prefix ids (the BOS
    token by default, as before every prompt); the target is the model's distribution for the token
    that follows it (the document's real next token is recorded as `next_token_id`). Padding rows
    beyond len(tokenizer) keep whatever mass the model gives them: these are the model's own
    distributions, so a zero-KL prompt exists.
    Returns: Targets (float32) with meta target_id "lm-<source>-s<seed>-<i>", kind "lm",
        source_model, context (text), context_ids (the exact ids fed, prefix included), position
        (index of the predicted token in its document; in the sample for sample=True), document,
        next_token_id, seed, index.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise TargetError(f"n must be a positive int, got {n!r}.")
    lo, hi = (int(x) for x in context_tokens)
    if not 1 <= lo <= hi:
        raise TargetError(f"context_tokens must be (min, max) with 1 ≤ min ≤ max; got {context_tokens!r}.")
    prefix_ids = list(lm.prompt_frame(model, tokenizer, prefix).prefix_ids)
    lengths = [lo + int(torch.randint(hi - lo + 1, (1,), generator=generator(derive_seed(seed, "lm", i))))
               for i in range(n)]
    if sample:
        prefix_ids, docs = _sampled_documents(model, tokenizer, n, max(lengths) + 1, seed, prefix_ids)
        doc_names, picks = [f"sample{i}" for i in range(n)], [(i, 0) for i in range(n)]
    else:
        doc_names, texts = _corpus_documents(corpus)
        docs = tokenizer(texts, add_special_tokens=False)["input_ids"]
        picks = [_pick_window(docs, length, derive_seed(seed, "lm", i, "position"))
                 for i, length in enumerate(lengths)]
    contexts, rows = [], []
    for (d, start), length in zip(picks, lengths, strict=True):
        window = docs[d][start:start + length]
        contexts.append(prefix_ids + window)
        rows.append({"context": tokenizer.decode(window), "position": start + length,
                     "document": doc_names[d], "next_token_id": docs[d][start + length]})
    probs = next_token_probs(model, contexts, batch_size=batch_size)
    source = _source_name(model) or "model"
    meta = pd.DataFrame(rows)
    meta.insert(0, "target_id", [f"lm-{source}{'-sampled' if sample else ''}-s{seed}-{i}" for i in range(n)])
    meta.insert(1, "kind", "lm")
    meta.insert(2, "source_model", _source_name(model))
    meta["context_ids"] = [list(c) for c in contexts]
    meta["sampled"], meta["seed"], meta["index"] = sample, seed, range(n)
    return Targets(probs, meta)


def _pick_window(docs: list[list[int]], length: int, seed: int) -> tuple[int, int]:
    """(document, start) of a window of `length` tokens followed by a real next token, uniform over the corpus."""
    counts = torch.tensor([max(0, len(d) - length) for d in docs], dtype=torch.long)
    total = int(counts.sum())
    if total == 0:
        raise TargetError(f"no document of the corpus has more than {length} tokens; pass a longer corpus "
                          "or a smaller context_tokens.")
    r = int(torch.randint(total, (1,), generator=generator(seed)))
    d = int(torch.searchsorted(counts.cumsum(0), torch.tensor(r), right=True))
    return d, r - int(counts[:d].sum())


@torch.no_grad()
def _sampled_documents(model, tokenizer, n: int, length: int, seed: int, prefix: list[int]):
    """(start ids, n sequences of `length` tokens sampled from the model after them); KV-cached.

    The start is the frame's prefix ids, else the EOS token.
    """
    start = prefix or ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
    if not start:
        raise TargetError("sample=True needs a start token: the tokenizer has no BOS or EOS token; "
                          "pass prefix='some text'.")
    lm.check_length(model, len(start) + length, "a sampled context")
    device = next(model.parameters()).device
    allowed = lm.allowed_tokens(tokenizer, logits_width(model)).to(device)
    g = generator(derive_seed(seed, "lm-sample"))
    ids, past, sampled = torch.tensor([start] * n, device=device), None, []
    cache_arg = lm.cache_kwarg(model)
    for _ in range(length):
        out = model(input_ids=ids, use_cache=True, **{cache_arg: past})
        past = lm.output_cache(out)
        logits = out.logits[:, -1, :].float().masked_fill(~allowed, -math.inf)
        ids = torch.multinomial(torch.softmax(logits, -1).cpu(), 1, generator=g).to(device)
        sampled.append(ids)
    return start, torch.cat(sampled, dim=1).cpu().tolist()


def reference(model, tokenizer, contexts: Sequence[str] | Sequence[Sequence[int]], *,
              prefix: str = "bos", batch_size: int = 16) -> Targets:
    """The model's own next-token distribution after each context: a zero-KL hard prompt exists.

    Args:
        contexts: strings, encoded in the prompt frame exactly as a prompt text is
            (`lm.prompt_frame(model, tokenizer, prefix).encode(text)`: the BOS token, then the
            text), so `score_prompt_text(model, tokenizer, contexts, targets)` gives KL 0; or lists
            of token ids (used as they are).
        prefix: the frame's prefix ("bos" by default, as for the optimisers).
    Returns: Targets (float32) with meta target_id "reference-<i>-<hash>", kind "reference",
        source_model, context (text), context_ids (the exact ids fed).
    """
    contexts = list(contexts)
    if not contexts:
        raise TargetError("contexts is empty; pass a list of strings or of token-id lists.")
    if all(isinstance(c, str) for c in contexts):
        frame = lm.prompt_frame(model, tokenizer, prefix)
        ids = [frame.encode(c) for c in contexts]
    elif all(isinstance(c, (list, tuple, Tensor)) for c in contexts):
        ids = [[int(t) for t in c] for c in contexts]
    else:
        raise TargetError("contexts must be all strings or all lists of token ids.")
    width = logits_width(model)
    for c in ids:
        if any(not 0 <= t < width for t in c):
            raise TargetError(f"context ids {c[:10]} fall outside [0, {width}).")
    probs = next_token_probs(model, ids, batch_size=batch_size)
    digest = [hashlib.sha256(json.dumps(c).encode()).hexdigest()[:8] for c in ids]
    meta = pd.DataFrame({
        "target_id": [f"reference-{i}-{d}" for i, d in enumerate(digest)], "kind": "reference",
        "source_model": _source_name(model), "context": [tokenizer.decode(c) for c in ids],
        "context_ids": ids})
    return Targets(probs, meta)

"""The cross-tokenizer vocabulary map: `vocab_map` (cached) and `map_vocab` (targets across it).

A source token's mass moves to the target token with the same raw bytes, else to the first token
of its text in the target tokenizer (see `vocab_map` for the rules and what is lost).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .. import lm
from .batch import TargetError, Targets, _check_vocab
from .tokenizer_bytes import _token_bytes, _tokenizer_fingerprint, _utf8_prefix

log = logging.getLogger(__name__)

MAP_METHODS = ("first_token", "exact")
_MAP_FORMAT = 2  # bump when the way maps are built changes: old disk entries are then ignored
_MAPS: dict[str, VocabMap] = {}  # in-memory cache, keyed like the disk cache


@dataclass(frozen=True)
class VocabMap:
    """A byte-level map from a source vocabulary to a target vocabulary.

    It is the sparse (source_width, target_vocab_size) 0/1 matrix with at most one 1 per row,
    stored as `dest`: (source_width,) int64, the target id that source token v's mass goes to,
    or −1 where the mass is lost. Between two different tokenizers the lost rows are the source's
    special tokens, its padding rows (≥ len(source_tokenizer)), tokens without bytes, tokens whose
    target token is special or ≥ target_vocab_size, and with "exact" tokens whose bytes are not
    one target token; from a tokenizer onto itself nothing is lost but padding rows beyond
    target_vocab_size (see `vocab_map`).
    """

    dest: Tensor
    target_vocab_size: int
    method: str
    key: str

    @property
    def source_width(self) -> int:
        return int(self.dest.shape[0])

    def matrix(self) -> Tensor:
        """The map as a sparse COO (source_width, target_vocab_size) float64 tensor."""
        rows = (self.dest >= 0).nonzero().flatten()
        return torch.sparse_coo_tensor(torch.stack([rows, self.dest[rows]]),
                                       torch.ones(len(rows), dtype=torch.float64),
                                       (self.source_width, self.target_vocab_size),
                                       check_invariants=True).coalesce()

    def apply(self, probs: Tensor) -> tuple[Tensor, Tensor]:
        """(T, source_width) probabilities → ((T, target_vocab_size) float64 mapped mass, (T,) mass lost).

        The mass lost is 1 − the mapped mass, clamped to [0, 1], for rows with mass on a lost
        source token, and exactly 0 for the others (a row that loses nothing is copied
        unchanged, whatever rounding its sum carries).
        """
        kept = self.dest >= 0
        probs = probs.detach().cpu()
        mapped = torch.zeros(len(probs), self.target_vocab_size, dtype=torch.float64)
        mapped.index_add_(1, self.dest[kept], probs[:, kept].double())
        dropped = (probs[:, ~kept] > 0).any(-1)
        lost = torch.where(dropped, (1.0 - mapped.sum(-1)).clamp(0.0, 1.0), torch.zeros((), dtype=torch.float64))
        return mapped, lost


def vocab_map(source_tokenizer, target_tokenizer, *, source_width: int, target_vocab_size: int,
              method: str = "first_token") -> VocabMap:
    """The (cached) byte-level map from a source vocabulary of width `source_width` to a target one.

    The same tokenizer on both sides (equal fingerprints) gives the identity on every row below
    min(source_width, target_vocab_size), special tokens and padding rows included; wider target
    rows get nothing. Otherwise each source token v < len(source_tokenizer) is placed by its raw
    bytes (read from its vocabulary string: GPT-2 byte-level, or SentencePiece "▁" and "<0xNN>"
    byte fallback; see `_token_bytes`):
    (a) onto a non-special target token with exactly these bytes: v itself if it qualifies, else
        the lowest id among regular tokens, else among byte-fallback pieces (the token the target
        tokenizer itself produces for these bytes);
    (b) else, if the bytes are valid UTF-8, its text is encoded by the target tokenizer (batched,
        without special tokens): "first_token" takes the first token, "exact" only a single token;
    (c) else (part of a UTF-8 character, e.g. the lone byte 0xE2) "first_token" takes the first
        token of its longest valid UTF-8 prefix, or where that is empty the target token that is
        exactly its first byte (byte-level and byte-fallback vocabularies have one per byte);
        "exact" loses it.
    Lost (dest −1): the source's special tokens, padding rows ≥ len(source_tokenizer), tokens
    with no bytes, tokens whose target token is special or ≥ target_vocab_size, and as above.

    Cached in memory and on disk under `cache_dir()/vocab_maps/<key>.npy` (written atomically),
    keyed by a hash of both tokenizers (their full tokenizer.json), the method, both widths and
    the map format. If the disk cache cannot be written, one warning is logged and the map is kept
    in memory only.
    """
    if method not in MAP_METHODS:
        raise TargetError(f"method={method!r} is not a mapping method; use one of {MAP_METHODS}.")
    from ..models import cache_dir, write_cache_file

    key = hashlib.sha256("|".join(map(str, [
        _tokenizer_fingerprint(source_tokenizer), _tokenizer_fingerprint(target_tokenizer), method,
        source_width, target_vocab_size, _MAP_FORMAT])).encode()).hexdigest()[:32]
    if key in _MAPS:
        return _MAPS[key]
    path = cache_dir() / "vocab_maps" / f"{key}.npy"
    dest = None
    if path.is_file():
        try:
            dest = torch.from_numpy(np.load(path)).long()
            if dest.shape != (source_width,):
                dest = None
        except (OSError, ValueError):
            dest = None
        if dest is None:
            log.warning("vocab map cache entry %s is unreadable; rebuilding it", path)
    if dest is None:
        dest = _build_dest(source_tokenizer, target_tokenizer, source_width, target_vocab_size, method)
        write_cache_file("vocab_maps", path.name, lambda f: np.save(f, dest.numpy().astype(np.int32)))
    _MAPS[key] = VocabMap(dest, target_vocab_size, method, key)
    return _MAPS[key]


def _build_dest(source_tokenizer, target_tokenizer, source_width: int, target_vocab_size: int,
                method: str) -> Tensor:
    """(source_width,) int64 target ids, −1 where lost: the rules of `vocab_map`."""
    dest = torch.full((source_width,), -1, dtype=torch.long)
    if _tokenizer_fingerprint(source_tokenizer) == _tokenizer_fingerprint(target_tokenizer):
        m = min(source_width, target_vocab_size)
        dest[:m] = torch.arange(m)
        log.info("vocab map (%s): the same tokenizer on both sides, identity on %d of %d rows",
                 method, m, source_width)
        return dest
    n = min(len(source_tokenizer), source_width)
    m = min(len(target_tokenizer), target_vocab_size)
    src_bytes, _ = _token_bytes(source_tokenizer, n)
    tgt_bytes, tgt_fallback = _token_bytes(target_tokenizer, m)
    src_special, tgt_special = lm.special_ids(source_tokenizer), lm.special_ids(target_tokenizer)
    by_bytes: dict[bytes, int] = {}
    for pieces in (False, True):  # regular tokens first, then byte-fallback pieces; lowest id first
        for t in range(m):
            if tgt_fallback[t] == pieces and tgt_bytes[t] and t not in tgt_special:
                by_bytes.setdefault(tgt_bytes[t], t)
    texts: dict[int, str] = {}  # source id → text to encode with the target tokenizer
    counts = dict.fromkeys(("bytes", "text", "prefix", "first byte"), 0)
    for v in range(n):
        data = src_bytes[v]
        if v in src_special or not data:
            continue
        t = v if v < m and tgt_bytes[v] == data and v not in tgt_special else by_bytes.get(data)
        if t is not None:
            dest[v] = t
            counts["bytes"] += 1
            continue
        text, whole = _utf8_prefix(data)
        if whole or (method == "first_token" and text):
            texts[v] = text
        elif method == "first_token" and (t := by_bytes.get(data[:1])) is not None:
            dest[v] = t
            counts["first byte"] += 1
    items = list(texts.items())
    encoded = target_tokenizer([s for _, s in items], add_special_tokens=False)["input_ids"] if items else []
    for (v, text), ids in zip(items, encoded, strict=True):
        if not ids or (method == "exact" and len(ids) != 1):
            continue
        t = ids[0]
        if t not in tgt_special and 0 <= t < target_vocab_size:
            dest[v] = t
            counts["text" if text.encode("utf-8") == src_bytes[v] else "prefix"] += 1
    log.info("vocab map (%s): %d of %d source tokens placed (by bytes %d, by text %d, partial UTF-8 by "
             "prefix %d, by first byte %d)", method, int((dest >= 0).sum()), source_width, counts["bytes"],
             counts["text"], counts["prefix"], counts["first byte"])
    return dest


def map_vocab(targets: Targets, source_tokenizer, target_tokenizer, target_vocab_size: int,
              method: str = "first_token") -> Targets:
    """Move targets from a source vocabulary onto a target model's vocabulary, by token bytes.

    See `vocab_map` for how each source token is placed: from a tokenizer onto itself the map is
    the identity (probs unchanged, mass_lost 0); across tokenizers the source's special tokens
    and padding rows lose their mass, and so, with "exact", do tokens whose bytes are not one
    target token. Mass that cannot be placed is recorded per target as `mass_lost` (in [0, 1],
    exactly 0 where the target has no mass on a lost token) and the rest is renormalised to sum
    to 1 (rows that lose nothing are copied unchanged).

    Args:
        targets: (T, source width) Targets over the source tokenizer's vocabulary.
        target_vocab_size: the target model's logits width (`logits_width(target_model)`).
        method: "first_token" or "exact".
    Returns: Targets (T, target_vocab_size), same dtype; meta keeps every source column (kind
        included) with target_id "mapped-<source id>", plus mapped=True, map_method, mass_lost,
        source_target_id, source_vocab_size; `context_ids` (source-tokenizer ids) is renamed
        `source_context_ids`.
    Raises TargetError when a target loses all of its mass.
    """
    if not isinstance(targets, Targets):
        raise TargetError(f"targets must be a Targets batch, got {type(targets).__name__}.")
    target_vocab_size = _check_vocab(target_vocab_size)
    if len(target_tokenizer) > target_vocab_size:
        raise TargetError(f"target_vocab_size={target_vocab_size} is smaller than the target tokenizer "
                          f"({len(target_tokenizer)} tokens); pass logits_width(target_model).")
    vmap = vocab_map(source_tokenizer, target_tokenizer, source_width=targets.vocab_size,
                     target_vocab_size=target_vocab_size, method=method)
    mapped, lost = vmap.apply(targets.probs)
    empty = lost >= 1.0 - 1e-12
    if empty.any():
        raise TargetError(f"targets {targets.meta['target_id'][empty.numpy()].tolist()[:5]} lose all their mass "
                          f"in the mapping ({method}): they sit on special tokens or on tokens the target "
                          "tokenizer cannot place; try method='first_token' or drop them.")
    scale = torch.where(lost > 0, mapped.sum(-1), torch.ones((), dtype=torch.float64))
    probs = (mapped / scale.unsqueeze(-1)).to(targets.probs.dtype)
    meta = targets.meta.copy()
    meta.insert(0, "source_target_id", meta.pop("target_id"))
    meta.insert(0, "target_id", ["mapped-" + t for t in meta["source_target_id"]])
    if "context_ids" in meta:
        meta = meta.rename(columns={"context_ids": "source_context_ids"})
    meta["mapped"], meta["map_method"] = True, method
    meta["mass_lost"], meta["source_vocab_size"] = lost.numpy(), targets.vocab_size
    return Targets(probs, meta)

"""What the vocabulary map reads from a tokenizer: each token's raw bytes, and a fingerprint.

`_token_bytes` reads the bytes from the vocabulary strings the way the tokenizer's own decoder
does (GPT-2 byte-level, or SentencePiece "▁" and "<0xNN>" byte fallback), so that a token that is
part of a UTF-8 character keeps its bytes. `_tokenizer_fingerprint` hashes everything that decides
how a tokenizer encodes and decodes: the identity a cached map is keyed by.
"""

from __future__ import annotations

import hashlib
import json
import logging

from .. import lm

log = logging.getLogger(__name__)

def _tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of everything that decides how the tokenizer decodes and encodes (memoised on it)."""
    memo = getattr(tokenizer, "_dplib_fingerprint", None)
    if memo is not None and memo[0] == len(tokenizer):
        return memo[1]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the full tokenizer.json: vocab, merges, normaliser, decoder, added tokens
        text = backend.to_str()
    else:
        text = json.dumps(sorted(tokenizer.get_vocab().items()))
    specials = sorted(lm.special_ids(tokenizer))
    digest = hashlib.sha256((type(tokenizer).__name__ + text + json.dumps(specials)).encode()).hexdigest()
    try:
        tokenizer._dplib_fingerprint = (len(tokenizer), digest)
    except AttributeError:  # some tokenizer wrappers refuse new attributes; then we just recompute
        pass
    return digest


def _gpt2_unicode_to_byte() -> dict[str, int]:
    """The inverse of GPT-2's bytes → printable-unicode table, which byte-level BPE vocabularies use."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: b for b in printable}
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + len(chars) - len(printable)
    return {chr(c): b for b, c in chars.items()}


_GPT2_BYTES = _gpt2_unicode_to_byte()


def _bytes_reader(tokenizer) -> tuple[str, str, bool]:
    """How to read a token's raw bytes from its vocabulary string: (kind, space marker, byte fallback).

    Decided from the tokenizer.json's decoder, which is what turns tokens back into bytes. kind is
    "byte_level" (the decoder, or with no decoder the pre-tokenizer, is ByteLevel: GPT-2, SmolLM2,
    Llama-3, dplib's tiny tokenizers), "sentencepiece" (the decoder turns a marker such as "▁"
    into a space, by Metaspace or Replace, and/or reads "<0xNN>" pieces as bytes, by ByteFallback:
    Gemma, Llama-2, T5) or "decode" (anything else: each token is decoded alone).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return "decode", "", False
    try:
        spec = json.loads(backend.to_str())
    except (TypeError, ValueError, AttributeError):
        return "decode", "", False

    def parts(node, key):
        node = node or {}
        return [p or {} for p in node.get(key, [])] if node.get("type") == "Sequence" else [node]

    decoders = parts(spec.get("decoder"), "decoders")
    types = {d.get("type") for d in decoders}
    if "ByteLevel" in types or (types == {None} and "ByteLevel" in {
            p.get("type") for p in parts(spec.get("pre_tokenizer"), "pretokenizers")}):
        return "byte_level", "", False
    marker = ""
    for d in decoders:
        if d.get("type") == "Metaspace":
            marker = d.get("replacement", "\u2581")
        elif d.get("type") == "Replace" and d.get("content") == " " and isinstance(d.get("pattern"), dict):
            marker = d["pattern"].get("String") or marker
    if marker or "ByteFallback" in types:
        return "sentencepiece", marker, "ByteFallback" in types
    return "decode", "", False


def _token_bytes(tokenizer, n: int) -> tuple[list[bytes | None], list[bool]]:
    """The raw bytes of tokens 0..n−1 (None where unknown) and which are byte-fallback pieces "<0xNN>".

    Read from the vocabulary strings as the tokenizer's decoder reads them (see `_bytes_reader`),
    so a byte-level token that is part of a UTF-8 character keeps its bytes (it decodes alone to
    U+FFFD). For a tokenizer of another kind each token is decoded alone, and tokens that decode
    to U+FFFD or to nothing get None.
    """
    kind, marker, pieces = _bytes_reader(tokenizer)
    strings = tokenizer.convert_ids_to_tokens(list(range(n))) if kind != "decode" else []
    fallback = [False] * n
    if kind == "byte_level":
        def read(s):  # as tokenizers' ByteLevel decoder: a string with a char outside the table is literal
            try:
                return bytes(_GPT2_BYTES[c] for c in s)
            except KeyError:
                return s.encode("utf-8")
        out = [None if s is None else read(s) for s in strings]
    elif kind == "sentencepiece":
        out = []
        for i, s in enumerate(strings):
            if s is None:
                out.append(None)
            elif pieces and len(s) == 6 and s.startswith("<0x") and s.endswith(">") \
                    and all(c in "0123456789abcdefABCDEF" for c in s[3:5]):
                out.append(bytes([int(s[3:5], 16)]))
                fallback[i] = True
            else:
                out.append((s.replace(marker, " ") if marker else s).encode("utf-8"))
    else:
        log.warning("cannot read raw token bytes from a %s; decoding each token alone (tokens that are "
                    "part of a UTF-8 character are lost)", type(tokenizer).__name__)
        texts = tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=False,
                                       clean_up_tokenization_spaces=False)
        out = [t.encode("utf-8") if t and "\ufffd" not in t else None for t in texts]
    return out, fallback


def _utf8_prefix(data: bytes) -> tuple[str, bool]:
    """(the longest prefix of `data` that is valid UTF-8, as text; whether that is all of it)."""
    try:
        return data.decode("utf-8"), True
    except UnicodeDecodeError as e:
        return data[:e.start].decode("utf-8"), False

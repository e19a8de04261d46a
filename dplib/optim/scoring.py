"""Exact, batched scoring of token prompts: KL(target ‖ model) at the last position, chunked, with
out-of-memory back-off, and `score_prompt_text`, the from-scratch check of what a prompt's text gives.

What the hard-prompt search and every check of a token prompt share. Only the last position reaches
the LM head (`lm.last_hidden` + the output layer as one 2-D matmul; never full-sequence logits).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .. import lm
from ..lm import OutputLayer, embed, last_hidden, output_layer
from ..targets import Targets

log = logging.getLogger(__name__)

__all__ = ["Chunker", "is_oom", "score_forward", "score_kl", "score_prompt_text"]


def is_oom(err: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None)
    return (oom is not None and isinstance(err, oom)) or (
        isinstance(err, RuntimeError) and "out of memory" in str(err).lower())


class Chunker:
    """Runs `fn(start, stop)` over [0, n) in chunks of at most `size`, halving `size` on OOM.

    The size is state: once halved it stays halved, so later steps do not retry a size that failed.
    """

    def __init__(self, size: int, what: str):
        self.size, self.what = size, what

    def run(self, n: int, fn: Callable[[int, int], None]) -> None:
        start = 0
        while start < n:
            stop = min(n, start + self.size)
            try:
                fn(start, stop)
            except Exception as err:  # noqa: BLE001 - only OOM is handled, everything else re-raised
                if not is_oom(err) or self.size == 1:
                    raise
                self.size = max(1, self.size // 2)
                log.warning("out of memory on a %s batch of %d: retrying with batches of %d",
                            self.what, stop - start, self.size)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            start = stop


def score_forward(model, head: OutputLayer, ids: Tensor, context_ids: Tensor | None = None) -> Tensor:
    """(batch, n) token ids → (batch, vocab) float32 next-token log-probabilities, last position only.

    context_ids: None, or (P,) ids of a fixed prefix that every row follows (not part of `ids`): it is run
    once per call and its key/value cache shared by the batch (`lm.last_hidden_after`).
    """
    if context_ids is None:
        hidden = last_hidden(model, embed(model, ids))
    else:
        hidden = lm.last_hidden_after(model, embed(model, context_ids.unsqueeze(0)), embed(model, ids))
    return torch.log_softmax(head.logits(hidden), dim=-1)


def score_kl(model, head: OutputLayer, ids: Tensor, owner: Tensor, target_probs: Tensor, neg_entropy: Tensor,
           chunker: Chunker, keep_logprobs: bool = False, context_ids: Tensor | None = None,
           ) -> tuple[Tensor, Tensor | None]:
    """KL(target[owner[i]] ‖ model(context + ids[i])) for every row of ids (N, n); chunked, no grad.

    context_ids: None (ids are whole sequences) or (P,) ids of a shared prefix run once per chunk.
    Returns (N,) float32 KL on ids' device and, if asked, the (N, vocab) log-probabilities.
    """
    kl = torch.empty(len(ids), dtype=torch.float32, device=ids.device)
    out = torch.empty(len(ids), target_probs.shape[1], device=ids.device) if keep_logprobs else None

    def chunk(a: int, b: int) -> None:
        logprobs = score_forward(model, head, ids[a:b], context_ids)
        rows = owner[a:b]
        kl[a:b] = neg_entropy[rows] - (target_probs[rows] * logprobs).sum(-1)
        if out is not None:
            out[a:b] = logprobs

    with torch.no_grad():
        chunker.run(len(ids), chunk)
    return kl, out


def score_prompt_text(model, tokenizer, texts: Sequence[str], targets: Targets, *, prefix: str = "bos",
               suffix: str = "") -> tuple[Tensor, Tensor]:
    """Score prompt TEXTS from scratch: tokenise each as the prompt frame does, run the model, compare.

    texts: T prompt texts, one per target (e.g. `Result.prompt_text`, or hand-written instructions).
    prefix, suffix: as in HardConfig (pass the config's values; prefix "chat" places each text as the
        user message of the chat template, so this scores instructions as an instruct model meets them).
    Returns (kl (T,) float32 nats, logprobs (T, vocab) float32), on CPU. Each text is run on its
    own (batch of one, no padding), so this is an independent check of what an optimiser reported.
    """
    targets.check_width(model)
    lm.check(model)
    if len(texts) != len(targets):
        raise ValueError(f"got {len(texts)} texts for {len(targets)} targets; pass one text per target.")
    frame = lm.prompt_frame(model, tokenizer, prefix, suffix)
    device = next(model.parameters()).device
    head = output_layer(model)
    kls, rows = [], []
    with torch.no_grad():
        for i, text in enumerate(texts):
            ids = torch.tensor([frame.encode(text)], device=device)
            logprobs = score_forward(model, head, ids)[0].cpu()
            p = targets.probs[i].float().cpu()
            kls.append((torch.special.xlogy(p, p) - p * logprobs).sum())
            rows.append(logprobs)
    return torch.stack(kls), torch.stack(rows)

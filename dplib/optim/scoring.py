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

__all__ = ["Chunker", "is_oom", "score_forward", "score_kl", "score_kl_after_shared", "score_prompt_text"]


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


def score_forward(model, head: OutputLayer, ids: Tensor, context_ids: Tensor | None = None,
                  context_index: Tensor | None = None) -> Tensor:
    """(batch, n) token ids → (batch, vocab) float32 next-token log-probabilities, last position only.

    context_ids: None; or (P,) ids of a fixed prefix that every row follows (not part of `ids`); or
    (C, P) contexts, with context_index (batch,) saying which one each row follows. Each context is run
    once per call and its key/value cache shared by its rows (`lm.last_hidden_after`).
    """
    if context_ids is None or context_ids.shape[-1] == 0:
        hidden = last_hidden(model, embed(model, ids))
    else:
        contexts = context_ids if context_ids.dim() == 2 else context_ids.unsqueeze(0)
        hidden = lm.last_hidden_after(model, embed(model, contexts), embed(model, ids), context_index)
    return torch.log_softmax(head.logits(hidden), dim=-1)


def score_kl(model, head: OutputLayer, ids: Tensor, owner: Tensor, target_probs: Tensor, neg_entropy: Tensor,
           chunker: Chunker, keep_logprobs: bool = False) -> tuple[Tensor, Tensor | None]:
    """KL(target[owner[i]] ‖ model(ids[i])) for every row of ids (N, n), whole sequences; chunked, no grad.

    (Candidates that share a context with their prompt are scored by `score_kl_after_shared`.) Returns (N,) float32 KL on ids' device and, if asked, the (N, vocab) log-probabilities.
    """
    kl = torch.empty(len(ids), dtype=torch.float32, device=ids.device)
    out = torch.empty(len(ids), target_probs.shape[1], device=ids.device) if keep_logprobs else None

    def chunk(a: int, b: int) -> None:
        logprobs = score_forward(model, head, ids[a:b])
        rows = owner[a:b]
        kl[a:b] = lm.kl_from_logprobs(target_probs[rows], logprobs, neg_entropy[rows])
        if out is not None:
            out[a:b] = logprobs

    with torch.no_grad():
        chunker.run(len(ids), chunk)
    return kl, out


# Fewest candidates scored together after one shared length: a start position with fewer joins the next
# smaller one (sharing less), because small batches run far below the hardware's peak (about 300 tokens per
# batch reach it on a CPU; docs/performance.md).
MIN_GROUP = 64


def merged_starts(start: Tensor, min_group: int) -> Tensor:
    """(N,) first differing positions → (N,) the shared lengths to score them after: runs of start positions,
    in increasing order, are merged until each run holds ≥ min_group candidates (the last run may hold fewer,
    unless it can join the one before), and every candidate of a run is scored after the run's smallest start."""
    values, counts = start.unique(return_counts=True)
    runs: list[list[int]] = []  # [smallest start, candidates] per run
    for v, c in zip(values.tolist(), counts.tolist(), strict=True):
        if runs and runs[-1][1] < min_group:
            runs[-1][1] += c
        else:
            runs.append([v, c])
    if len(runs) > 1 and runs[-1][1] < min_group:
        runs[-2][1] += runs.pop()[1]
    bounds = torch.tensor([r[0] for r in runs], dtype=start.dtype, device=start.device)
    return bounds[torch.searchsorted(bounds, start, right=True) - 1]


def score_kl_after_shared(model, head: OutputLayer, prefix_ids: Tensor, current: Tensor, cands: Tensor,
                          start: Tensor, owner: Tensor, suffix_ids: Tensor, target_probs: Tensor,
                          neg_entropy: Tensor, chunker: Chunker) -> Tensor:
    """KL of candidate prompts, each run after the key/value cache of what it shares with its target's prompt.

    Candidate i equals `current[owner[i]]` before position `start[i]`, so [prefix, current[owner[i], :start[i]]]
    is its context: the candidates of one start position are scored together (start positions with few
    candidates are merged into the run below them: `merged_starts`), each context run once per chunk (the
    distinct owners' contexts as one batch) and its cache gathered over the candidates. A candidate then
    costs its own L − start positions (+ suffix), not P + L (+ suffix).

    prefix_ids: (P,) the fixed prefix; current: (T, L) the prompts the candidates were made from;
    cands: (N, L) candidate prompt ids; start: (N,) long, the first position where each may differ;
    owner: (N,) target index of each; suffix_ids: (S,); target_probs (T, vocab), neg_entropy (T,) Σ p log p.
    All on the model's device. Returns (N,) float32 KL, nats.
    """
    kl = torch.empty(len(cands), dtype=torch.float32, device=cands.device)
    start = merged_starts(start, MIN_GROUP)
    for s in start.unique().tolist():
        rows = (start == s).nonzero().flatten()

        def chunk(a: int, b: int, s: int = s, rows: Tensor = rows) -> None:
            mine = rows[a:b]
            who = owner[mine]
            rest = torch.cat([cands[mine, s:], suffix_ids.expand(len(mine), -1)], dim=1)
            contexts, index = who.unique(return_inverse=True)
            context_ids = torch.cat([prefix_ids.expand(len(contexts), -1), current[contexts, :s]], dim=1)
            logprobs = score_forward(model, head, rest, context_ids, index)  # an empty context: whole sequences
            kl[mine] = lm.kl_from_logprobs(target_probs[who], logprobs, neg_entropy[who])

        with torch.no_grad():
            chunker.run(len(rows), chunk)
    return kl


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
            kls.append(lm.kl_from_logprobs(p, logprobs))
            rows.append(logprobs)
    return torch.stack(kls), torch.stack(rows)

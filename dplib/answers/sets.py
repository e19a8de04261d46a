"""Answer sets and their next-token targets: `answer_set` (validated), `other_forms` (the
leading-space and capitalisation toggles), `answer_targets` (the marginal over the answers' first
tokens in their canonical tokenisation).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pandas as pd
import torch

from .. import lm
from ..targets import SUM_TOLERANCE, TargetError, Targets


@dataclass(frozen=True)
class AnswerSet:
    """A validated distribution over answer strings: answers (A,) and probs (A,) summing to 1."""

    answers: tuple[str, ...]
    probs: tuple[float, ...]

    def as_dict(self) -> dict[str, float]:
        return dict(zip(self.answers, self.probs, strict=True))


def answer_set(dist: Mapping[str, float] | Sequence[tuple[str, float]] | AnswerSet) -> AnswerSet:
    """Validate a distribution over answer strings: a dict {answer: probability} or (answer, p) pairs.

    Raises TargetError for an empty set, a repeated or empty answer, a probability that is not a finite
    number ≥ 0, or probabilities that do not sum to 1 within 1e-4 (the message gives the sum).
    """
    if isinstance(dist, AnswerSet):
        return dist
    pairs = list(dist.items()) if isinstance(dist, Mapping) else list(dist)
    if not pairs:
        raise TargetError("the answer set is empty; give at least one answer, e.g. {'heads': 0.5, 'tails': 0.5}.")
    answers = [a for a, _ in pairs]
    bad = [a for a in answers if not isinstance(a, str) or a == ""]
    if bad:
        raise TargetError(f"answers must be non-empty strings; got {bad[:5]}.")
    repeated = sorted({a for a in answers if answers.count(a) > 1})
    if repeated:
        raise TargetError(f"answers {repeated} appear more than once; give each answer once with its total probability.")
    probs = []
    for a, p in pairs:
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or p < 0:
            raise TargetError(f"the probability of {a!r} is {p!r}; use a finite number ≥ 0.")
        probs.append(float(p))
    total = math.fsum(probs)
    if abs(total - 1.0) > SUM_TOLERANCE:
        raise TargetError(f"the answer probabilities sum to {total:.6g}, not 1 (within {SUM_TOLERANCE}); "
                          "divide each by their sum, or add the missing answers.")
    return AnswerSet(tuple(answers), tuple(probs))


def other_forms(answers: Sequence[str]) -> dict[str, str]:
    """{other form: the answer it is a form of}: the leading-space toggle ("7" ↔ " 7"), the
    capitalisation toggle of the first letter ("yes" ↔ "Yes"), and both; forms that are answers
    themselves are left out (they are scored as answers)."""
    out: dict[str, str] = {}
    for a in answers:
        spaced = a[1:] if a.startswith(" ") else " " + a
        cands = [spaced]
        for s in (a, spaced):
            i = len(s) - len(s.lstrip(" "))
            if i < len(s) and s[i].isalpha():
                cands.append(s[:i] + s[i].swapcase() + s[i + 1:])
        for c in cands:
            if c and c not in answers and c not in out:
                out[c] = a
    return out


def _answer_ids(tokenizer, strings: Sequence[str], context: str) -> list[tuple[int, ...]]:
    """The canonical token ids of each string right after `context` (the frame's suffix text).

    Raises TargetError when the string merges with the context's last token (its tokens cannot be
    told apart from the context's), tokenises to nothing or to special tokens, or does not decode back.
    """
    ctx = list(tokenizer.encode(context, add_special_tokens=False)) if context else []
    special = lm.special_ids(tokenizer)
    out = []
    for s in strings:
        ids = list(tokenizer.encode(context + s, add_special_tokens=False))
        if ids[:len(ctx)] != ctx:
            raise TargetError(f"the answer {s!r} merges with the text before it ({context[-20:]!r}) when tokenised, so "
                              "its tokens are not a continuation of the frame; state the answer with or without a "
                              "leading space, or change the frame's suffix.")
        ids = ids[len(ctx):]
        if not ids or any(i in special for i in ids):
            raise TargetError(f"the answer {s!r} tokenises to {ids} (empty, or special tokens); use answer text.")
        if tokenizer.decode(ids) != s:
            raise TargetError(f"the answer {s!r} tokenises to {ids}, which decode to {tokenizer.decode(ids)!r}; "
                              "use a string the tokenizer represents exactly.")
        out.append(tuple(ids))
    return out


def answer_targets(model, tokenizer, tasks: Mapping[str, Mapping[str, float]], *, prefix: str = "chat",
                   suffix: str = "") -> Targets:
    """One next-token target per task: the target's mass on each first token of the answers' tokenisations.

    tasks: {task name: {answer: probability}} (validated by `answer_set`).
    prefix, suffix: the prompt frame the targets will be optimised in (`lm.prompt_frame`; default the
        chat template): answers are tokenised as they follow the frame's suffix text.
    Returns Targets (T = len(tasks), width = the model's logits width), kind "answers", target_id
    "answers-<task>", meta: task, answers (JSON of the answer distribution), prefix, suffix, n_answers,
    n_first_tokens, first_token_shared (some answers share a first token: the next-token target
    cannot tell them apart; `score_strings` can).
    """
    if not tasks:
        raise TargetError("no tasks given; pass {task name: {answer: probability}}.")
    frame = lm.prompt_frame(model, tokenizer, prefix, suffix)
    width = lm.logits_width(model)
    rows, meta = [], []
    for task, dist in tasks.items():
        aset = answer_set(dist)
        ids = _answer_ids(tokenizer, aset.answers, frame.suffix_text)  # distinct: each decodes to its answer
        probs = torch.zeros(width, dtype=torch.float64)
        for i, p in zip(ids, aset.probs, strict=True):
            probs[i[0]] += p
        probs /= probs.sum()  # within 1e-4 of 1 already; exact for KL
        firsts = {i[0] for i in ids}
        rows.append(probs)
        meta.append({"target_id": f"answers-{task}", "kind": "answers", "task": task,
                     "answers": json.dumps(aset.as_dict()), "prefix": prefix, "suffix": suffix,
                     "n_answers": len(ids), "n_first_tokens": len(firsts),
                     "first_token_shared": len(firsts) < len(ids)})
    return Targets(torch.stack(rows), pd.DataFrame(meta))

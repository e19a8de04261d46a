"""Targets over answer strings: {"heads": 0.5, "tails": 0.5}, the numbers 1-10, a skewed yes/no.

A distribution over answer *strings* meets the optimisers, which match a next-token distribution,
through the prefix tree (trie) of the answers' tokenisations:

- `answer_targets`: the next-token target is the marginal over first tokens (answers sharing a
  first token, such as "1" and "10", pool their mass on it; `first_token_shared` says so).
- `score_strings`: the distribution a prompt induces over the full strings, exact: the model's
  conditionals are chained along every path of the trie (one batched forward per call, log-probs
  after every answer position), so P(answer) = Π P(token | frame, prompt, earlier tokens) times the
  probability of ending there (below). What is left is `mass_outside`, the mass off the answer set.

What an answer is, stated once:
- **Its form is the string as given, in its canonical tokenisation**: the tokens the tokenizer gives
  for it where it stands, right after the frame's suffix text (so a tokenizer that merges across that
  boundary is caught, and a SentencePiece dummy prefix is not mistaken for the answer). Other token
  sequences that decode to the same string (a model almost never emits them) count as off the set.
- **Other forms** of an answer (`other_forms`: the leading-space toggle " 7" / "7" and the
  capitalisation toggle "Yes" / "yes", where they are not answers themselves) are scored the same way
  and reported as `mass_other_forms` (part of `mass_outside`): an instruct model that says "Heads"
  when "heads" was meant loses that mass, and the report says where it went.
- **Where an answer ends** (`stop`): with `stop="word"` (the default) an answer counts when the token
  after it starts a new word: its text is empty (special tokens, e.g. the end of the turn) or starts
  with a character that is not a letter or digit ("7." and "7<|im_end|>" are "7"; "75" is not), and it
  does not continue into a longer answer ("1" then "0" is "10"). With `stop=None` a continuation counts
  for the deepest answer whose tokens it begins with, whatever follows ("15" counts as "1"). With a
  list of one-token strings (e.g. ["<|im_end|>"]) an answer counts only when one of them follows it:
  the strictest, for a model that should say nothing else. Each gives disjoint events, so the answer
  probabilities and mass_outside sum to 1.

`score_prompts` / `score_result` apply `score_strings` to every target of a batch and give a tidy
table; `answers_kl` is KL(target ‖ induced) over the answers and the "outside" event, in nats.
"""

from __future__ import annotations

import json
import math
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor

from . import lm
from .targets import SUM_TOLERANCE, TargetError, Targets, _token_bytes

__all__ = ["AnswerSet", "StringScores", "answer_set", "answer_targets", "answers_kl", "other_forms",
           "score_prompts", "score_result", "score_strings"]


# --------------------------------------------------------------------------------------------
# The answer set: validation.
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Tokenisation in context, and the trie.
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Next-token targets.
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Scoring the strings a prompt induces.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StringScores:
    """The distribution one prompt induces over an answer set.

    answers: the A answers; probs: (A,) float64 P(answer) (see the module docstring for the event).
    mass_outside: 1 − Σ probs, the mass off the answer set (other forms included).
    forms: {other form: (its answer, P(form))}; mass_other_forms: their total (⊂ mass_outside).
    target: (A,) float64 target probabilities, or None when the answers came without them.
    """

    answers: tuple[str, ...]
    probs: Tensor
    mass_outside: float
    forms: dict[str, tuple[str, float]]
    mass_other_forms: float
    target: Tensor | None = None

    def kl(self) -> float:
        """KL(target ‖ induced) over the answers and "outside" (target 0 there), nats."""
        if self.target is None:
            raise ValueError("these scores have no target probabilities; pass answers as {answer: probability}.")
        return answers_kl(self.target, self.probs)

    def frame(self) -> pd.DataFrame:
        """One row per answer: answer, target_prob (NaN without a target), model_prob, other_form_prob."""
        other = {a: 0.0 for a in self.answers}
        for answer, p in self.forms.values():
            other[answer] += p
        return pd.DataFrame({"answer": list(self.answers),
                             "target_prob": (self.target.numpy() if self.target is not None
                                             else [math.nan] * len(self.answers)),
                             "model_prob": self.probs.numpy(), "other_form_prob": [other[a] for a in self.answers]})


def answers_kl(target: Tensor, model_probs: Tensor) -> float:
    """KL(p ‖ q) in nats over answers + "outside": p = target (A,) (0 outside), q = model_probs (A,)
    plus 1 − Σ q outside; float64, 0·log 0 = 0, inf where a target answer has model probability 0."""
    p, q = target.double(), model_probs.double().clamp_min(0)
    inside = p > 0
    if bool((q[inside] == 0).any()):
        return math.inf
    return float((p[inside] * (p[inside].log() - q[inside].log())).sum())


def _prompt_embeds(model, prompt, device) -> Tensor:
    """A prompt (text handled by the caller; ids (L,); embeddings (L, d)) → (L, d) input embeddings."""
    if isinstance(prompt, Tensor) and prompt.is_floating_point():
        if prompt.ndim != 2:
            raise ValueError(f"soft prompt embeddings must have shape (L, d_model); got {tuple(prompt.shape)}.")
        return prompt.to(device)
    ids = torch.as_tensor(list(map(int, prompt)), dtype=torch.long, device=device)
    return lm.embed(model, ids).float()


def _framed_embeds(model, tokenizer, frame: lm.PromptFrame, prompt, device) -> Tensor:
    """(1, n, d) input embeddings of the framed prompt, exactly as the optimisers feed it: text through
    `frame.encode` (the from-scratch tokenisation), ids and embeddings between the frame's ids."""
    if isinstance(prompt, str):
        return lm.embed(model, torch.tensor([frame.encode(prompt)], device=device))
    middle = _prompt_embeds(model, prompt, device)
    pre = lm.embed(model, torch.tensor(frame.prefix_ids, dtype=torch.long, device=device))
    suf = lm.embed(model, torch.tensor(frame.suffix_ids, dtype=torch.long, device=device))
    dtype = pre.dtype
    return torch.cat([pre, middle.to(dtype), suf], dim=0).unsqueeze(0)


def _path_probs(model, head, context: Tensor, paths: Sequence[tuple[int, ...]]) -> dict[tuple[int, ...], Tensor]:
    """{node: (vocab,) float64 next-token log-probs} for every prefix (root included) of every path.

    context: (1, n, d) the framed prompt's input embeddings. The context runs once; then the longest
    paths, right-padded (a causal model's output at a position never sees later ones), as one batch.
    """
    leaves = [p for p in set(paths) if not any(q != p and q[:len(p)] == p for q in paths)]
    leaves.sort()
    depth = max(len(p) for p in leaves)
    ids = torch.zeros(len(leaves), depth, dtype=torch.long, device=context.device)
    for r, p in enumerate(leaves):
        ids[r, :len(p)] = torch.tensor(p, dtype=torch.long)
    with torch.no_grad():
        logprobs = lm.continuation_logprobs(model, context, lm.embed(model, ids).to(context.dtype), head)
    logprobs = logprobs.double().cpu()  # (leaves, depth + 1, vocab)
    out = {}
    for r, p in enumerate(leaves):
        for k in range(len(p) + 1):
            out.setdefault(p[:k], logprobs[r, k])
    return out


_WORD_ENDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> (len, mask)


def _word_ends(tokenizer, width: int) -> Tensor:
    """(width,) bool: tokens that end a word before them (empty text, or a first character that is not a
    letter or digit). Padding rows beyond the tokenizer have no text and count as ends, like specials."""
    memo = _WORD_ENDS.get(tokenizer)
    if memo is None or memo[0] != len(tokenizer):
        n = len(tokenizer)
        raw, _ = _token_bytes(tokenizer, n)  # the bytes the decoder writes (a SentencePiece "▁" is a space)
        special = lm.special_ids(tokenizer)

        def ends(i: int, data: bytes | None) -> bool:
            if i in special or not data:
                return True
            first = data.decode("utf-8", errors="replace")[0]
            return first != "\ufffd" and not first.isalnum()  # part of a UTF-8 character: continues a word

        memo = (n, torch.tensor([ends(i, d) for i, d in enumerate(raw)], dtype=torch.bool))
        _WORD_ENDS[tokenizer] = memo
    mask = torch.ones(width, dtype=torch.bool)
    mask[:min(width, memo[0])] = memo[1][:width]
    return mask


def _stop_mask(tokenizer, stop, width: int) -> Tensor | None:
    """None (no condition on what follows) or a (width,) bool mask of the tokens that end an answer."""
    if stop is None:
        return None
    if stop == "word":
        return _word_ends(tokenizer, width)
    if isinstance(stop, str) or not stop:
        raise ValueError(f"stop must be 'word', None or a non-empty list of strings (each one token); got {stop!r}.")
    mask = torch.zeros(width, dtype=torch.bool)
    for s in stop:
        ids = tokenizer.encode(s, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"stop string {s!r} is {len(ids)} tokens {ids}; each stop must be exactly one token.")
        mask[int(ids[0])] = True
    return mask


def _score_paths(model, tokenizer, context: Tensor, paths: Sequence[tuple[int, ...]],
                 stop: Tensor | None) -> Tensor:
    """(P,) float64 probability of each path's event (see the module docstring), one forward."""
    head = lm.output_layer(model)
    node_lp = _path_probs(model, head, context, paths)
    children: dict[tuple[int, ...], set[int]] = {}
    for p in paths:
        for k in range(len(p)):
            children.setdefault(p[:k], set()).add(p[k])
    out = []
    for p in paths:
        log_prefix = sum(float(node_lp[p[:k]][p[k]]) for k in range(len(p)))
        probs = node_lp[p].exp()
        ends = torch.ones_like(probs, dtype=torch.bool) if stop is None else stop.clone()
        ends[list(children.get(p, ()))] = False  # a token that continues into a longer answer is not an end
        end = float(probs[ends].sum())
        out.append(math.exp(log_prefix) * max(end, 0.0))
    return torch.tensor(out, dtype=torch.float64)


def score_strings(model, tokenizer, prompt, answers, *, prefix: str = "bos", suffix: str = "",
                  stop: str | Sequence[str] | None = "word", forms: bool = True) -> StringScores:
    """The distribution `prompt` induces over the answer strings, exact (chained conditionals).

    prompt: prompt text (str, tokenised in the frame from scratch, as `score_prompt_text` does), token
        ids (sequence of ints or a (L,) long tensor), or soft-prompt embeddings ((L, d_model) float).
    answers: {answer: target probability} (validated, so `kl()` works) or a sequence of answer strings.
    prefix, suffix: the prompt frame (`lm.prompt_frame`; "chat" = inside the chat template).
    stop: "word" (the next token starts a new word), None (nothing asked of the next token), or
        one-token strings of which one must follow the answer (e.g. ["<|im_end|>"]); see the module
        docstring.
    forms: also score the answers' other forms (`other_forms`).
    Returns StringScores (probs (A,) float64, mass_outside, forms, mass_other_forms, target).
    """
    if isinstance(answers, (Mapping, AnswerSet)):
        aset = answer_set(answers)
        strings, target = aset.answers, torch.tensor(aset.probs, dtype=torch.float64)
    else:
        strings, target = tuple(answers), None
        if not strings:
            raise TargetError("the answer set is empty; give at least one answer.")
        answer_set([(a, 1.0 / len(strings)) for a in strings])  # the same checks: empty strings, repeats
    lm.check(model)
    frame = lm.prompt_frame(model, tokenizer, prefix, suffix)
    variants = other_forms(strings) if forms else {}
    names = [*strings, *variants]
    ids = [*_answer_ids(tokenizer, strings, frame.suffix_text),
           *_answer_ids_lenient(tokenizer, list(variants), frame.suffix_text)]
    device = next(model.parameters()).device
    with torch.no_grad():
        context = _framed_embeds(model, tokenizer, frame, prompt, device)
    scored = [(n, i) for n, i in zip(names, ids, strict=True) if i is not None]
    stop_mask = _stop_mask(tokenizer, stop, lm.logits_width(model))
    probs = _score_paths(model, tokenizer, context, [i for _, i in scored], stop_mask)
    by_name = {n: float(p) for (n, _), p in zip(scored, probs, strict=True)}
    answer_probs = torch.tensor([by_name[a] for a in strings], dtype=torch.float64)
    form_probs = {v: (a, by_name[v]) for v, a in variants.items() if v in by_name}
    return StringScores(strings, answer_probs, float(1.0 - answer_probs.sum()), form_probs,
                        math.fsum(p for _, p in form_probs.values()), target)


def _answer_ids_lenient(tokenizer, strings: Sequence[str], context: str) -> list[tuple[int, ...] | None]:
    """As `_answer_ids`, but None for a form the tokenizer cannot state after the context (it is then not
    scored: e.g. " 7" where the context ends in a space)."""
    out = []
    for s in strings:
        try:
            out.append(_answer_ids(tokenizer, [s], context)[0])
        except TargetError:
            out.append(None)
    return out


def _target_answers(targets: Targets) -> list[dict[str, float]]:
    if "answers" not in targets.meta:
        raise TargetError("these targets carry no answer strings (meta 'answers'); build them with "
                          "dplib.answers.answer_targets.")
    return [json.loads(a) for a in targets.meta["answers"]]


def score_prompts(model, tokenizer, prompts: Sequence, targets: Targets, *, prefix: str, suffix: str = "",
                  stop: str | Sequence[str] | None = "word", method: str = "") -> pd.DataFrame:
    """`score_strings` for each target with its own prompt: a tidy table, one row per target × answer.

    prompts: T prompts (text, ids or (L, d) embeddings, as `score_strings` takes), in the targets' order.
    targets: built by `answer_targets` (their meta holds the answer distributions).
    Columns: target_id, task, method, answer, target_prob, model_prob, other_form_prob, and per target
    (repeated on its rows) kl_answers_nats, mass_outside, mass_other_forms.
    """
    if len(prompts) != len(targets):
        raise ValueError(f"got {len(prompts)} prompts for {len(targets)} targets; pass one prompt per target.")
    frames = []
    for prompt, dist, (_, row) in zip(prompts, _target_answers(targets), targets.meta.iterrows(), strict=True):
        scores = score_strings(model, tokenizer, prompt, dist, prefix=prefix, suffix=suffix, stop=stop)
        df = scores.frame()
        df.insert(0, "method", method)
        df.insert(0, "task", row.get("task"))
        df.insert(0, "target_id", row["target_id"])
        df["kl_answers_nats"] = scores.kl()
        df["mass_outside"] = scores.mass_outside
        df["mass_other_forms"] = scores.mass_other_forms
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def score_result(model, tokenizer, result, targets: Targets, *,
                 stop: str | Sequence[str] | None = "word") -> pd.DataFrame:
    """`score_prompts` on an optimiser's Result, in the frame its config used (meta["config"]).

    Soft results are scored by their prompt embeddings, hard ones by their prompt ids. Results with no
    input-space prompt (the bounds; layer_bound's vectors live after a layer) raise ValueError.
    """
    config = result.meta.get("config", {})
    if result.method == "soft" and result.prompt_embeds is not None:
        prompts = list(result.prompt_embeds)
    elif result.method == "hard" and result.prompt_ids is not None:
        prompts = [list(map(int, p)) for p in result.prompt_ids.tolist()]
    else:
        raise ValueError(f"a {result.method!r} result has no input-space prompt to score strings after; "
                         "score_result takes soft and hard results.")
    if list(result.target_ids) != targets.ids:
        raise ValueError("the result's target_ids differ from the targets'; pass the targets the result was made for.")
    return score_prompts(model, tokenizer, prompts, targets, prefix=config.get("prefix", "bos"),
                         suffix=config.get("suffix", ""), stop=stop, method=result.method)

"""The distribution a prompt induces over answer strings, exact (`score_strings`), along the trie of
the answers' tokenisations; `score_prompts` / `score_result` for a batch of targets as a tidy table;
`answers_kl` in nats.
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

from .. import lm
from ..targets import TargetError, Targets, _token_bytes
from .sets import AnswerSet, _answer_ids, answer_set, other_forms


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

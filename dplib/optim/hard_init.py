"""Where a hard-prompt search starts: random tokens that survive re-tokenisation, the target's own most
probable tokens (`HardConfig.init="target"`), or given text (`HardConfig.init_text`, one per target); and
`resolve_length`, L from that text's token count."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..lm import PromptFrame
from .hard_config import HardConfig

__all__ = ["initial_prompts", "resolve_length"]


def random_prompt(tokenizer, frame: PromptFrame, allowed_ids: Tensor, L: int, check: bool,
                   gen: torch.Generator, tries: int = 200) -> list[int]:
    """L random allowed tokens; with `check`, built token by token so that it survives re-tokenisation."""
    bare = PromptFrame((), "", "", (), (), None, tokenizer)  # the prompt alone, no frame
    for _ in range(tries):
        ids: list[int] = []
        for _ in range(L):
            for _ in range(50):
                tok = int(allowed_ids[torch.randint(len(allowed_ids), (1,), generator=gen)])
                if not check or bare.text_reproduces([ids + [tok]])[0][0]:
                    break
            ids.append(tok)
        if not check or frame.text_reproduces([ids])[0][0]:
            return ids
    raise RuntimeError(f"could not draw a random prompt of {L} tokens that survives re-tokenisation in "
                       f"{tries} tries; set init_text, or retokenize_filter=False.")


def target_prompt(frame: PromptFrame, probs: Tensor, allowed: Tensor, L: int, check: bool) -> list[int] | None:
    """L tokens from the target itself: its most probable allowed tokens, the most probable last (LMs copy from
    their context, most of all from its end); a target with fewer than L such tokens repeats them. With `check`,
    a token that would break re-tokenisation is skipped. probs: (vocab,) one target. None if no L tokens fit."""
    mass = probs.float().cpu() * allowed.cpu()
    n_mass = int((mass > 0).sum())
    if n_mass == 0:
        return None
    pool = mass.argsort(descending=True)[: min(n_mass, 4 * L)].tolist()  # the most probable first
    order = (pool * (L // len(pool) + 1))[: 4 * L]  # repeated when the target has fewer than L tokens
    ids: list[int] = []
    for tok in order:  # each prepended: the most probable ends the prompt
        trial = [tok] + ids
        if not check or frame.text_reproduces([trial])[0][0]:
            ids = trial
        if len(ids) == L:
            return ids
    return None


def init_texts(config: HardConfig, n_targets: int) -> list[str] | None:
    """init_text as one text per target (a single text is shared by all), or None for random prompts."""
    if config.init_text is None:
        return None
    if isinstance(config.init_text, str):
        return [config.init_text] * n_targets
    if len(config.init_text) != n_targets:
        raise ValueError(f"init_text holds {len(config.init_text)} texts for {n_targets} targets; give one text per "
                         "target (in the targets' order), or a single text for all.")
    return list(config.init_text)


def resolve_length(tokenizer, config: HardConfig, n_targets: int) -> HardConfig:
    """The config with prompt_length set: with prompt_length=None, L is the token count of init_text (every
    target's text must have the same count: a batch shares one L; `dplib.proposers.warm_started_hard`
    groups texts of different lengths into separate runs)."""
    if config.prompt_length is not None:
        return config
    texts = init_texts(config, n_targets)
    lengths = {len(tokenizer.encode(t, add_special_tokens=False)) for t in texts}
    if len(lengths) != 1:
        raise ValueError(f"prompt_length=None but the init texts tokenise to different lengths {sorted(lengths)}; "
                         "one search runs one L: run texts of each length separately "
                         "(dplib.proposers.warm_started_hard does), or set prompt_length.")
    L = lengths.pop()
    for name in ("n_swaps", "n_swaps_end"):
        value = getattr(config, name)
        if value is not None and value > L:
            raise ValueError(f"{name}={value} exceeds the init texts' length L={L}; use {name} ≤ {L}.")
    return dataclasses.replace(config, prompt_length=L)


def initial_prompts(tokenizer, frame: PromptFrame, config: HardConfig, allowed: Tensor,
                     gens: list[torch.Generator], probs: Tensor) -> list[list[int]]:
    """Each target's first prompt, (T lists of L ids): init_text's tokens, else by `config.init`.
    allowed: (vocab,) bool; gens: one generator per target; probs: (T, vocab) the targets."""
    L = config.prompt_length
    texts = init_texts(config, len(gens))
    if texts is None:
        if config.init == "random":
            allowed_ids = allowed.nonzero().flatten().cpu()
            return [random_prompt(tokenizer, frame, allowed_ids, L, config.retokenize_filter, g) for g in gens]
        prompts = [target_prompt(frame, p, allowed, L, config.retokenize_filter) for p in probs]
        missing = [i for i, ids in enumerate(prompts) if ids is None]
        if missing:
            raise ValueError(f"init='target': targets {missing} have fewer allowed tokens with mass than fit a "
                             f"{L}-token prompt that re-tokenises to itself; use init='random' (or init_text).")
        return prompts
    prompts = []
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) != L:
            raise ValueError(f"init_text={text!r} tokenises to {len(ids)} tokens but prompt_length={L}; "
                             f"set prompt_length={len(ids)} (or None: the text's token count) or change the text.")
        bad = [i for i in ids if not allowed[i]]
        if bad:
            raise ValueError(f"init_text={text!r} contains disallowed tokens {tokenizer.convert_ids_to_tokens(bad)} "
                             "(special tokens, or non-ASCII with ascii_only=True); change the text.")
        if config.retokenize_filter and not frame.text_reproduces([ids])[0][0]:
            raise ValueError(f"init_text={text!r} does not re-tokenise to the same ids when joined with the "
                             "prefix/suffix; change it (e.g. spacing at the boundaries) or set retokenize_filter=False.")
        prompts.append(list(ids))
    return prompts

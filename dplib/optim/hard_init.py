"""Where a hard-prompt search starts: the target's own most probable tokens (`HardConfig.init="target"`, the
default), random tokens that survive re-tokenisation (`init="random"`), or given text (`HardConfig.init_text`,
one per target, whatever `init` says); and `resolve_length`, L from that text's token count."""

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


def target_prompt(tokenizer, frame: PromptFrame, probs: Tensor, allowed: Tensor, L: int, check: bool,
                  gen: torch.Generator, tries: int = 50) -> list[int]:
    """L tokens from the target itself: its most probable allowed tokens, the most probable last (LMs copy from
    their context, most of all from its end); a target with fewer than L such tokens repeats them. With `check`,
    a token that would break re-tokenisation is skipped. Positions the target's tokens cannot fill (a target
    whose few tokens merge when repeated, or one with no allowed token at all) start as random allowed tokens,
    before the target's. probs: (vocab,) one target."""
    mass = probs.float().cpu() * allowed.cpu()
    n_mass = int((mass > 0).sum())
    pool = mass.argsort(descending=True)[: min(n_mass, 4 * L)].tolist() if n_mass else []  # most probable first
    order = (pool * (L // max(1, len(pool)) + 1))[: 4 * L]  # repeated when the target has fewer than L tokens
    ids: list[int] = []
    for tok in order:  # each prepended: the most probable ends the prompt
        trial = [tok] + ids
        if not check or frame.text_reproduces([trial])[0][0]:
            ids = trial
        if len(ids) == L:
            return ids
    allowed_ids = allowed.nonzero().flatten().cpu()
    for _ in range(tries):
        head = random_prompt(tokenizer, frame, allowed_ids, L - len(ids), check, gen)
        if not check or frame.text_reproduces([head + ids])[0][0]:
            return head + ids
    raise RuntimeError(f"could not put {L - len(ids)} random tokens before the target's own {len(ids)} so that "
                       f"the prompt survives re-tokenisation in {tries} tries; set init='random', init_text, "
                       "or retokenize_filter=False.")


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
        return [target_prompt(tokenizer, frame, p, allowed, L, config.retokenize_filter, g)
                for p, g in zip(probs, gens, strict=True)]
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

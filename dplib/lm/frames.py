"""The prompt frame: the one rule for what surrounds a prompt, for every method and target builder.

BOS, prefix and suffix text, or the chat template with prefix "chat" (`chat_frame`); used identically
by soft, hard, layer_bound, `reference`, `from_model` and scoring.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from .decoder import max_positions

log = logging.getLogger(__name__)


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


@dataclass(frozen=True)
class PromptFrame:
    """The fixed parts around a prompt and the one rule that joins them.

    A prompt of ids P is fed as `prefix_ids + P + suffix_ids`; a prompt *text* t is fed as
        special + encode(prefix_text + t + suffix_text)        (`encode`)
    and the two agree exactly when t re-tokenises to P in place (`text_reproduces`).

    special: token ids before everything: the tokenizer's BOS token when prefix == "bos" (and
        the tokenizer has one), never text.
    prefix_text, suffix_text: fixed text around the prompt.
    prefix_ids, suffix_ids: `special + encode(prefix_text)` and `encode(suffix_text)`.
    max_positions: the model's position limit (None = none stated).
    """

    special: tuple[int, ...]
    prefix_text: str
    suffix_text: str
    prefix_ids: tuple[int, ...]
    suffix_ids: tuple[int, ...]
    max_positions: int | None = None
    _tokenizer: object = field(default=None, repr=False, compare=False)

    @property
    def joined(self) -> bool:
        """True when prefix or suffix text can merge with the prompt text at a boundary."""
        return bool(self.prefix_text or self.suffix_text)

    def check_length(self, n_prompt: int) -> None:
        """Refuse a prompt of n_prompt positions that, framed, exceeds the model's position limit."""
        n = len(self.prefix_ids) + n_prompt + len(self.suffix_ids)
        if self.max_positions is not None and n > self.max_positions:
            raise ValueError(f"a prompt of {n_prompt} positions with its prefix ({len(self.prefix_ids)}) and suffix "
                             f"({len(self.suffix_ids)}) has {n} positions, but the model accepts at most "
                             f"{self.max_positions}; use a shorter prompt_length, prefix or suffix.")

    def ids(self, prompt_ids: Sequence[int]) -> list[int]:
        """prefix_ids + prompt_ids + suffix_ids."""
        return [*self.prefix_ids, *map(int, prompt_ids), *self.suffix_ids]

    def encode(self, text: str) -> list[int]:
        """The from-scratch tokenisation of a prompt text, as the model sees it."""
        return [*self.special, *_encode(self._tokenizer, self.prefix_text + text + self.suffix_text)]

    def text_reproduces(self, prompts: Sequence[Sequence[int]]) -> tuple[list[bool], list[str]]:
        """For each prompt (ids), whether its decoded text re-tokenises to exactly its ids, alone and
        framed (so the text means what was scored); and the decoded texts."""
        tok = self._tokenizer
        prompts = [list(map(int, p)) for p in prompts]
        if not prompts:
            return [], []
        texts = tok.batch_decode(prompts)
        alone = tok(texts, add_special_tokens=False)["input_ids"]
        ok = [list(a) == p for a, p in zip(alone, prompts, strict=True)]
        idx = [i for i, good in enumerate(ok) if good]
        if self.joined and idx:
            whole = tok([self.prefix_text + texts[i] + self.suffix_text for i in idx],
                        add_special_tokens=False)["input_ids"]
            middle = list(self.prefix_ids[len(self.special):])
            for i, w in zip(idx, whole, strict=True):
                ok[i] = list(w) == middle + prompts[i] + list(self.suffix_ids)
        return ok, texts


def bos_id(tokenizer) -> int | None:
    """The BOS token id dplib puts before every prompt and context: the tokenizer's, or None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return None if bos is None else int(bos)


CHAT = "chat"  # the `prefix` value that places the prompt inside the tokenizer's chat template


class ChatTemplateError(ValueError):
    """prefix="chat" cannot be used with this tokenizer; the message says what to set instead."""


def prompt_frame(model, tokenizer, prefix: str = "bos", suffix: str = "") -> PromptFrame:
    """The frame around a prompt: prefix "bos" = the tokenizer's BOS token (nothing if it has none),
    "" = nothing, "chat" = the tokenizer's chat template (`chat_frame`), any other string = that
    literal text; suffix = literal text after the prompt (with "chat": inside the user message)."""
    if not isinstance(prefix, str) or not isinstance(suffix, str):
        raise TypeError(f"prefix and suffix must be strings ('bos', 'chat', '' or text); got {prefix!r}, {suffix!r}.")
    if prefix == CHAT:
        return chat_frame(model, tokenizer, suffix)
    special: tuple[int, ...] = ()
    prefix_text = prefix
    if prefix == "bos":
        prefix_text = ""
        bos = bos_id(tokenizer)
        if bos is not None:
            special = (bos,)
        else:
            log.info("prefix='bos' but the tokenizer has no BOS token: no prefix is used")
    return PromptFrame(special, prefix_text, suffix, special + tuple(_encode(tokenizer, prefix_text)),
                       tuple(_encode(tokenizer, suffix)), max_positions(model), tokenizer)


# A marker no template alters: the user message is rendered with it, then split there.
_PLACEHOLDER = "<<dplib-prompt-7f3a>>"


def chat_frame(model, tokenizer, suffix: str = "") -> PromptFrame:
    """The frame that places the prompt inside the model's chat template.

    The conversation is one user message, `prompt + suffix`, rendered by the tokenizer's chat
    template with the generation prompt, so the next token is the first of the assistant's answer
    (the template's default system message, if it adds one, is kept: it is what the model sees in
    use). The rendering is split at the prompt: prefix_text is everything before it, suffix_text
    everything after (`suffix`, the end of the user turn, the assistant header).

    BOS: templates write the BOS token as text (Gemma's "<bos>", SmolLM2's "<|im_start|>"); when the
    rendering starts with the tokenizer's BOS text it is moved into `special` as the id, once, so it
    is never doubled. The frame is checked against the conversation as Hugging Face tokenises it
    (`tokenizer(apply_chat_template(..., tokenize=False), add_special_tokens=False)`) on a probe
    prompt, and the template must insert the user message verbatim (a template that trims or
    rewrites it cannot hold an optimised prompt unchanged): either failure raises ChatTemplateError.
    """
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ChatTemplateError(
            f"prefix='chat' needs a chat template, but {type(tokenizer).__name__} has none "
            "(tokenizer.chat_template is not set; base models usually have none). Set "
            "tokenizer.chat_template to the model's Jinja template, or frame the prompt with plain text "
            "instead: prefix='bos', suffix='\\nAnswer:'.")

    def render(content: str) -> str:
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)

    rendered = render(_PLACEHOLDER + suffix)
    if rendered.count(_PLACEHOLDER) != 1:
        raise ChatTemplateError("the chat template does not render the user message exactly once; dplib cannot "
                                "place a prompt in it. Set tokenizer.chat_template to one that does.")
    before, after = rendered.split(_PLACEHOLDER)
    pad = " \n"  # whitespace a trimming template would drop: the message must come through verbatim
    if render(pad + _PLACEHOLDER + pad + suffix) != before + pad + _PLACEHOLDER + pad + after:
        raise ChatTemplateError(
            "the chat template changes the user message (e.g. trims whitespace around it), so an optimised "
            "prompt would not reach the model unchanged. Set tokenizer.chat_template to a version that "
            "inserts message['content'] as is (e.g. without `| trim`).")
    special: tuple[int, ...] = ()
    bos, bos_text = bos_id(tokenizer), getattr(tokenizer, "bos_token", None)
    if bos is not None and bos_text and before.startswith(bos_text):
        special, before = (bos,), before[len(bos_text):]
    frame = PromptFrame(special, before, after, special + tuple(_encode(tokenizer, before)),
                        tuple(_encode(tokenizer, after)), max_positions(model), tokenizer)
    probe = "Hello there"
    expected = list(tokenizer(render(probe + suffix), add_special_tokens=False)["input_ids"])
    if frame.encode(probe) != expected:
        raise ChatTemplateError(
            "dplib's split of the chat template does not tokenise like the rendered conversation "
            f"({frame.encode(probe)} vs {expected} on a probe); the template's prefix or suffix text "
            "merges with the user message. Use prefix/suffix text instead of prefix='chat'.")
    return frame

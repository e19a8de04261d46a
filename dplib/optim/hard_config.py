"""`HardConfig`: every knob of the hard-prompt search (`optim.hard`), as plain, validated values."""

from __future__ import annotations

from dataclasses import dataclass

from .common import is_int, is_real, require

__all__ = ["HardConfig"]


@dataclass(frozen=True)
class HardConfig:
    """Every knob of `optimize_hard`, as plain values (written to run metadata as is)."""

    prompt_length: int | None = 10  # L, tokens in the optimised prompt (default 10); None = init_text's token count
    steps: int = 100  # maximum search steps per target (default 100)
    top_k: int = 256  # replacement tokens per position ranked by the gradient (default 256)
    n_candidates: int = 256  # B, candidate prompts scored per target per step (default 256)
    n_swaps: int = 1  # positions changed per candidate at the first step, ≤ prompt_length (default 1, as in GCG)
    n_swaps_end: int | None = None  # positions changed at the last step, linear in between; None = n_swaps throughout
    # share of each target's candidates whose first swapped position takes one of the target's own tokens, drawn
    # with the target's probabilities (LMs copy from their context; a first-order gradient ranking misses it)
    copy_share: float = 0.25
    # True: move to each step's best candidate even where it is worse than the current prompt (as GCG does; the best
    # prompt seen is what is returned); False: move only on improvement (a pure descent, which gets stuck)
    always_move: bool = True
    # after this many steps without a new best, restart from one of the `buffer_size` best prompts seen (drawn at
    # random); 0 = never restart (default 0)
    restart_after: int = 0
    buffer_size: int = 8  # best distinct prompts kept per target for restarts (default 8)
    # where a search without init_text starts: "target" = the target's own most probable allowed tokens, the most
    # probable last (repeated if it has fewer than L; positions they cannot fill start random), because LMs copy
    # from their context: at equal cost it reached a lower mean KL than random starts on each of
    # benchmarks/hard_quality.py's vanilla sets (docs/performance.md); "random" = random allowed tokens, which
    # measured better on model-made targets (the model's own distributions: their top tokens are what it
    # predicts, not what it copies) (default "target")
    init: str = "target"
    # initial prompt text, or a tuple of one text per target (e.g. hand-written instructions to improve);
    # each must tokenise to exactly L tokens (prompt_length=None: L is their token count); None = start by `init`.
    # Given text is where the search starts, whatever `init` says.
    init_text: str | tuple[str, ...] | None = None
    # fixed text before the prompt: "bos" = the BOS token (nothing if the tokenizer has none), "chat" = the
    # prompt is the user message of the tokenizer's chat template (lm.chat_frame), "" = none, else literal text
    prefix: str = "bos"
    suffix: str = ""  # fixed text after the prompt (with prefix "chat": the rest of the user message) (default none)
    ascii_only: bool = False  # restrict prompt tokens to printable ASCII text (default False)
    retokenize_filter: bool = True  # keep only candidates whose text re-tokenises to the same ids (default True)
    patience: int = 20  # stop a target after this many steps without a new best; 0 = never (default 20)
    seed: int = 0  # base seed; each target's generator derives from (seed, target_id) (default 0)
    candidate_batch: int = 512  # max sequences per forward pass; halves on out-of-memory (default 512)
    # score each candidate after the key/value cache of what it shares with the prompt it was made from (the fixed
    # prefix and the tokens before its first swap), run once per batch instead of once per candidate (checked
    # against whole sequences when the search starts); False = whole sequences (default True)
    reuse_prefix: bool = True

    def __post_init__(self):
        def need(ok: bool, msg: str):
            require(ok, f"HardConfig: {msg}")

        if isinstance(self.init_text, list):  # a JSON round trip gives a list: keep the frozen form
            object.__setattr__(self, "init_text", tuple(self.init_text))
        texts = (self.init_text,) if isinstance(self.init_text, str) else self.init_text or ()
        need(self.init_text is None or (isinstance(self.init_text, (str, tuple)) and len(texts) > 0
                                        and all(isinstance(t, str) and t != "" for t in texts)),
             f"init_text must be None (start by init), non-empty text, or a tuple of non-empty texts (one per "
             f"target), got {self.init_text!r}.")
        need(self.init in ("random", "target"),
             f"init must be 'random' (random tokens) or 'target' (the target's most probable tokens), got {self.init!r}.")
        need(self.prompt_length is not None or self.init_text is not None,
             "prompt_length=None takes L from init_text's token count; give init_text, or an integer prompt_length.")
        for name in ("prompt_length", "steps", "top_k", "n_candidates", "n_swaps", "n_swaps_end", "buffer_size",
                     "candidate_batch"):
            value = getattr(self, name)
            if name in ("prompt_length", "n_swaps_end") and value is None:
                continue
            need(is_int(value) and value >= 1,
                 f"{name} must be an integer ≥ 1, got {value!r}.")
        for name in ("patience", "restart_after"):
            value = getattr(self, name)
            need(is_int(value) and value >= 0,
                 f"{name} must be an integer ≥ 0 (0 = never), got {value!r}.")
        need(is_real(self.copy_share) and 0.0 <= self.copy_share <= 1.0,
             f"copy_share must be a number in [0, 1] (0 = gradient proposals only), got {self.copy_share!r}.")
        need(is_int(self.seed), f"seed must be an integer, got {self.seed!r}.")
        for name in ("n_swaps", "n_swaps_end"):
            value = getattr(self, name)
            need(self.prompt_length is None or value is None or value <= self.prompt_length,
                 f"{name}={value} exceeds prompt_length={self.prompt_length}; use {name} ≤ prompt_length.")
        need(isinstance(self.prefix, str),
             f"prefix must be a string: 'bos' (the BOS token), '' (none) or literal text; got {self.prefix!r}.")
        need(isinstance(self.suffix, str), f"suffix must be a string ('' for none), got {self.suffix!r}.")
        for name in ("ascii_only", "retokenize_filter", "always_move", "reuse_prefix"):
            need(isinstance(getattr(self, name), bool), f"{name} must be True or False, got {getattr(self, name)!r}.")

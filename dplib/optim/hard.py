"""Hard prompts: L real tokens found by gradient-guided coordinate search, toward full distributions.

The HotFlip / AutoPrompt / GCG family, batched over T targets. One step, for every target still
running:

1. **Rank replacements by the gradient.** The KL of all T targets is summed and differentiated in
   one backward pass with respect to the prompt's input embeddings (T, L, d_model); multiplying by
   the embedding matrix, `grad @ Eᵀ`, gives the gradient with respect to the one-hot token matrix
   (T, L, vocab) — the same numbers as differentiating a one-hot matmul, and 10-24 % faster on CPU.
   Disallowed tokens (special tokens, padding rows, optionally non-ASCII) are masked out; the
   `top_k` most negative entries per position are the replacement candidates.
2. **Sample B candidates per target**: each swaps `n_swaps` distinct random positions to random
   tokens from those positions' top-k (each target draws from its own seeded generator, derived
   from (seed, target_id), so a target's search does not depend on which others share its batch).
3. **Filter** (`retokenize_filter`, on by default): a candidate survives only if its decoded text
   re-tokenises to exactly its ids — on its own *and* joined with the prefix and suffix text — so
   the reported prompt text means what the optimiser scored. Duplicates are dropped.
4. **Score every surviving candidate exactly**, all targets' candidates together, in batched
   forward passes that read the last position only (`lm.last_hidden` + the output layer as one
   2-D matmul; never full-sequence logits). Batches are `candidate_batch` sequences at most and
   halve automatically when memory runs out (the smaller size is kept for later steps).
5. Each target keeps its best candidate when it lowers the target's current KL; a target that has
   not improved for `patience` steps stops and is no longer scored.

How a prompt is tokenised is `lm.PromptFrame`'s one rule (the contract `score_prompt_text` checks
from scratch): ids = [BOS if prefix == "bos"] + encode(prefix_text + prompt_text + suffix); with
prefix "chat" the prefix and suffix text are the chat template's rendering around the user message
(`lm.chat_frame`), so the prompt is what the user says and the target is the assistant's first token.
`init_text` starts the search from given text (e.g. the best hand-written instruction, one per target)
instead of random tokens; with prompt_length=None, L is that text's token count. The
optimiser works on the segments `[BOS] + encode(prefix_text)`, the L prompt ids and `encode(suffix)`;
the filter guarantees that the whole-string tokenisation equals that concatenation, so the decoded
`prompt_text` run through the model from scratch gives the reported KL (up to float noise of
batching, ≪ 1e-4). With the filter off, a prompt whose text does not re-tokenise to its ids is
reported with `prompt_text` None.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import lm
from ..lm import (
    OutputLayer,
    PromptFrame,
    allowed_tokens,
    embed,
    last_hidden,
    logits_width,
    output_layer,
)
from ..seeds import derive_seed, generator
from ..targets import Targets
from .common import BestTracker, Result

log = logging.getLogger(__name__)

__all__ = ["HardConfig", "HardSearch", "optimize_hard", "resolve_length", "score_prompt_text"]


# --------------------------------------------------------------------------------------------
# Configuration.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HardConfig:
    """Every knob of `optimize_hard`, as plain values (written to run metadata as is)."""

    prompt_length: int | None = 10  # L, tokens in the optimised prompt (default 10); None = init_text's token count
    steps: int = 100  # maximum search steps per target (default 100)
    top_k: int = 256  # replacement tokens per position ranked by the gradient (default 256)
    n_candidates: int = 256  # B, candidate prompts scored per target per step (default 256)
    n_swaps: int = 1  # positions changed per candidate, ≤ prompt_length (default 1, as in GCG)
    # initial prompt text, or a tuple of one text per target (e.g. hand-written instructions to improve);
    # each must tokenise to exactly L tokens (prompt_length=None: L is their token count); None = random tokens
    init_text: str | tuple[str, ...] | None = None
    # fixed text before the prompt: "bos" = the BOS token (nothing if the tokenizer has none), "chat" = the
    # prompt is the user message of the tokenizer's chat template (lm.chat_frame), "" = none, else literal text
    prefix: str = "bos"
    suffix: str = ""  # fixed text after the prompt (with prefix "chat": the rest of the user message) (default none)
    ascii_only: bool = False  # restrict prompt tokens to printable ASCII text (default False)
    retokenize_filter: bool = True  # keep only candidates whose text re-tokenises to the same ids (default True)
    patience: int = 20  # stop a target after this many steps without improvement; 0 = never (default 20)
    seed: int = 0  # base seed; each target's generator derives from (seed, target_id) (default 0)
    candidate_batch: int = 512  # max sequences per forward pass; halves on out-of-memory (default 512)

    def __post_init__(self):
        def need(ok: bool, msg: str):
            if not ok:
                raise ValueError(f"HardConfig: {msg}")

        if isinstance(self.init_text, list):  # a JSON round trip gives a list: keep the frozen form
            object.__setattr__(self, "init_text", tuple(self.init_text))
        texts = (self.init_text,) if isinstance(self.init_text, str) else self.init_text or ()
        need(self.init_text is None or (isinstance(self.init_text, (str, tuple)) and len(texts) > 0
                                        and all(isinstance(t, str) and t != "" for t in texts)),
             f"init_text must be None (random tokens), non-empty text, or a tuple of non-empty texts (one per "
             f"target), got {self.init_text!r}.")
        need(self.prompt_length is not None or self.init_text is not None,
             "prompt_length=None takes L from init_text's token count; give init_text, or an integer prompt_length.")
        for name in ("prompt_length", "steps", "top_k", "n_candidates", "n_swaps", "candidate_batch"):
            value = getattr(self, name)
            if name == "prompt_length" and value is None:
                continue
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                 f"{name} must be an integer ≥ 1, got {value!r}.")
        need(isinstance(self.patience, int) and not isinstance(self.patience, bool) and self.patience >= 0,
             f"patience must be an integer ≥ 0 (0 = never stop early), got {self.patience!r}.")
        need(isinstance(self.seed, int) and not isinstance(self.seed, bool), f"seed must be an integer, got {self.seed!r}.")
        need(self.prompt_length is None or self.n_swaps <= self.prompt_length,
             f"n_swaps={self.n_swaps} exceeds prompt_length={self.prompt_length}; use n_swaps ≤ prompt_length.")
        need(isinstance(self.prefix, str),
             f"prefix must be a string: 'bos' (the BOS token), '' (none) or literal text; got {self.prefix!r}.")
        need(isinstance(self.suffix, str), f"suffix must be a string ('' for none), got {self.suffix!r}.")
        for name in ("ascii_only", "retokenize_filter"):
            need(isinstance(getattr(self, name), bool), f"{name} must be True or False, got {getattr(self, name)!r}.")


# --------------------------------------------------------------------------------------------
# Batched exact scoring, with out-of-memory back-off.
# --------------------------------------------------------------------------------------------


def _is_oom(err: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None)
    return (oom is not None and isinstance(err, oom)) or (
        isinstance(err, RuntimeError) and "out of memory" in str(err).lower())


class _Chunker:
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
                if not _is_oom(err) or self.size == 1:
                    raise
                self.size = max(1, self.size // 2)
                log.warning("out of memory on a %s batch of %d: retrying with batches of %d",
                            self.what, stop - start, self.size)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            start = stop


def _score_forward(model, head: OutputLayer, ids: Tensor) -> Tensor:
    """(batch, n) token ids → (batch, vocab) float32 next-token log-probabilities, last position only."""
    return torch.log_softmax(head.logits(last_hidden(model, embed(model, ids))), dim=-1)


def _score(model, head: OutputLayer, ids: Tensor, owner: Tensor, target_probs: Tensor, neg_entropy: Tensor,
           chunker: _Chunker, keep_logprobs: bool = False) -> tuple[Tensor, Tensor | None]:
    """KL(target[owner[i]] ‖ model(ids[i])) for every row of ids (N, n); chunked, no grad.

    Returns (N,) float32 KL on ids' device and, if asked, the (N, vocab) log-probabilities.
    """
    kl = torch.empty(len(ids), dtype=torch.float32, device=ids.device)
    out = torch.empty(len(ids), target_probs.shape[1], device=ids.device) if keep_logprobs else None

    def chunk(a: int, b: int) -> None:
        logprobs = _score_forward(model, head, ids[a:b])
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
            logprobs = _score_forward(model, head, ids)[0].cpu()
            p = targets.probs[i].float().cpu()
            kls.append((torch.special.xlogy(p, p) - p * logprobs).sum())
            rows.append(logprobs)
    return torch.stack(kls), torch.stack(rows)


# --------------------------------------------------------------------------------------------
# The search.
# --------------------------------------------------------------------------------------------


def _token_gradient(model, head, fmt_ids: tuple[Tensor, Tensor], prompt_ids: Tensor, target_probs: Tensor,
                    neg_entropy: Tensor, emb_weight: Tensor, emb_scale: float) -> tuple[Tensor, Tensor]:
    """Gradient of Σ_t KL_t w.r.t. the one-hot prompt tokens, and the KL at the current prompts.

    prompt_ids: (T, L); target_probs: (T, vocab). Returns grad (T, L, vocab) float32, kl (T,).
    """
    prefix_ids, suffix_ids = fmt_ids
    n = len(prompt_ids)
    with torch.no_grad():
        fixed_pre = embed(model, prefix_ids.expand(n, -1))
        fixed_suf = embed(model, suffix_ids.expand(n, -1))
    with torch.enable_grad():
        prompt_embeds = embed(model, prompt_ids).detach().requires_grad_(True)  # (T, L, d_model)
        inputs = torch.cat([fixed_pre, prompt_embeds, fixed_suf], dim=1)
        logprobs = torch.log_softmax(head.logits(last_hidden(model, inputs)), dim=-1)
        kl = neg_entropy - (target_probs * logprobs).sum(-1)
        (grad,) = torch.autograd.grad(kl.sum(), prompt_embeds)
    # d loss / d onehot[t, i, v] = s · <grad[t, i], E[v]>
    onehot_grad = (grad.to(emb_weight.dtype) @ emb_weight.T).float()
    if emb_scale != 1.0:
        onehot_grad *= emb_scale
    return onehot_grad, kl.detach()


def _sample_candidates(top: Tensor, current: Tensor, n: int, n_swaps: int, gen: torch.Generator) -> Tensor:
    """n candidates from one prompt: swap n_swaps distinct positions to tokens from their top-k.

    top: (L, k) replacement tokens per position (CPU); current: (L,). Returns (n, L) ids (CPU).
    """
    L, k = top.shape
    pos = torch.rand(n, L, generator=gen).argsort(dim=1)[:, :n_swaps]  # distinct positions per candidate
    pick = torch.randint(k, (n, n_swaps), generator=gen)
    cands = current.unsqueeze(0).repeat(n, 1)
    cands.scatter_(1, pos, top[pos, pick])
    return cands


def _random_prompt(tokenizer, frame: PromptFrame, allowed_ids: Tensor, L: int, check: bool,
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


def _init_texts(config: HardConfig, n_targets: int) -> list[str] | None:
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
    texts = _init_texts(config, n_targets)
    lengths = {len(tokenizer.encode(t, add_special_tokens=False)) for t in texts}
    if len(lengths) != 1:
        raise ValueError(f"prompt_length=None but the init texts tokenise to different lengths {sorted(lengths)}; "
                         "one search runs one L: run texts of each length separately "
                         "(dplib.proposers.warm_started_hard does), or set prompt_length.")
    L = lengths.pop()
    if config.n_swaps > L:
        raise ValueError(f"n_swaps={config.n_swaps} exceeds the init texts' length L={L}; use n_swaps ≤ {L}.")
    return dataclasses.replace(config, prompt_length=L)


def _initial_prompts(tokenizer, frame: PromptFrame, config: HardConfig, allowed: Tensor,
                     gens: list[torch.Generator]) -> list[list[int]]:
    L = config.prompt_length
    texts = _init_texts(config, len(gens))
    if texts is None:
        allowed_ids = allowed.nonzero().flatten().cpu()
        return [_random_prompt(tokenizer, frame, allowed_ids, L, config.retokenize_filter, g) for g in gens]
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


class HardSearch:
    """The state of one batched search: current prompts, their KL, the tracker, the chunk sizes.

    `optimize_hard` is `HardSearch(...)` then `step()` until done, then `result()`; the benchmark
    times `step()` on its own. `timings` accumulates seconds per phase ("gradient", "sample",
    "score") over all steps.
    """

    def __init__(self, model, tokenizer, targets: Targets, config: HardConfig):
        targets.check_width(model)
        self.t0 = time.perf_counter()
        config = resolve_length(tokenizer, config, len(targets))
        self.model, self.tokenizer, self.targets, self.config = model, tokenizer, targets, config
        self.device = device = next(model.parameters()).device
        T = len(targets)

        self.frame = frame = lm.prompt_frame(model, tokenizer, config.prefix, config.suffix)
        frame.check_length(config.prompt_length)
        lm.check(model)  # the fast path below is the model's own forward (once per model)
        allowed = allowed_tokens(tokenizer, logits_width(model), ascii_only=config.ascii_only)
        n_allowed = int(allowed.sum())
        if config.top_k > n_allowed:
            raise ValueError(f"top_k={config.top_k} exceeds the {n_allowed} allowed tokens; lower top_k.")
        self.gens = [generator(derive_seed(config.seed, tid, "hard")) for tid in targets.ids]
        # (T, L) current = best prompt of each target, on CPU
        self.current = torch.tensor(_initial_prompts(tokenizer, frame, config, allowed, self.gens), dtype=torch.long)

        self.head = output_layer(model)
        self.emb_weight, self.emb_scale = lm.embedding_matrix(model, self.current[0].to(device))
        self.disallowed = (~allowed).to(device)
        self.target_probs = targets.probs.to(device=device, dtype=torch.float32)
        self.neg_entropy = torch.special.xlogy(self.target_probs, self.target_probs).sum(-1)  # (T,) Σ p log p
        self.prefix_ids = torch.tensor(frame.prefix_ids, dtype=torch.long, device=device)
        self.suffix_ids = torch.tensor(frame.suffix_ids, dtype=torch.long, device=device)

        self.scorer = _Chunker(config.candidate_batch, "candidate")
        self.grad_chunker = _Chunker(config.candidate_batch, "gradient")
        self.every = torch.arange(T, device=device)
        kl, _ = _score(model, self.head, self.full(self.current), self.every, self.target_probs,
                       self.neg_entropy, self.scorer)
        self.current_kl = kl.cpu()
        self.initial_kl = self.current_kl.clone()
        self.tracker = BestTracker(T, patience=config.patience)
        self.tracker.best = self.initial_kl.clone()
        self.trace: list[Tensor] = []
        self.n_scored = 0
        self.n_steps = 0
        self.timings = {"gradient": 0.0, "sample": 0.0, "score": 0.0}

    def full(self, prompt_ids: Tensor) -> Tensor:
        """(N, L) prompt ids → (N, P + L + S) model input ids on the model's device."""
        n = len(prompt_ids)
        return torch.cat([self.prefix_ids.expand(n, -1), prompt_ids.to(self.device),
                          self.suffix_ids.expand(n, -1)], dim=1)

    @property
    def done(self) -> bool:
        return self.tracker.done or self.n_steps >= self.config.steps

    def top_tokens(self, active: Tensor) -> Tensor:
        """(A,) active target indices → (A, L, top_k) replacement tokens ranked by the gradient (CPU)."""
        cfg, dev = self.config, self.device
        top = torch.empty(len(active), cfg.prompt_length, cfg.top_k, dtype=torch.long)

        def chunk(a: int, b: int) -> None:
            rows = active[a:b]
            ids = self.current[rows].to(dev)
            g, _ = _token_gradient(self.model, self.head, (self.prefix_ids, self.suffix_ids), ids,
                                   self.target_probs[rows.to(dev)], self.neg_entropy[rows.to(dev)],
                                   self.emb_weight, self.emb_scale)
            g.masked_fill_(self.disallowed, math.inf)  # in place: g is (A, L, vocab), large for big vocabularies
            g.scatter_(2, ids.unsqueeze(-1), math.inf)  # a swap must change the token
            top[a:b] = g.topk(cfg.top_k, dim=-1, largest=False).indices.cpu()

        self.grad_chunker.run(len(active), chunk)
        return top

    def candidates(self, active: Tensor, top: Tensor) -> tuple[Tensor, Tensor]:
        """B sampled, deduplicated, filtered candidates per active target: ids (N, L), owner (N,), CPU."""
        cfg = self.config
        cand_rows, owners = [], []
        for j, t in enumerate(active.tolist()):
            cands = _sample_candidates(top[j], self.current[t], cfg.n_candidates, cfg.n_swaps, self.gens[t])
            cands = torch.unique(cands, dim=0)  # sorted: the order is a function of the set alone
            if cfg.retokenize_filter:
                ok, _ = self.frame.text_reproduces(cands.tolist())
                cands = cands[torch.tensor(ok, dtype=torch.bool)]
            cand_rows.append(cands)
            owners.append(torch.full((len(cands),), t, dtype=torch.long))
        return torch.cat(cand_rows), torch.cat(owners)

    def step(self) -> None:
        """One search step for every active target."""
        T = len(self.targets)
        active = self.tracker.active.nonzero().flatten()
        tic = time.perf_counter()
        top = self.top_tokens(active)
        tac = time.perf_counter()
        cand_ids, owner = self.candidates(active, top)
        toc = time.perf_counter()
        if len(cand_ids):
            kl, _ = _score(self.model, self.head, self.full(cand_ids), owner.to(self.device),
                           self.target_probs, self.neg_entropy, self.scorer)
            kl = kl.cpu()
            self.n_scored += len(cand_ids)
            best_kl = torch.full((T,), math.inf).scatter_reduce(0, owner, kl, reduce="amin")
            for t in active.tolist():  # keep the best candidate where it improves on the current prompt
                if best_kl[t] < self.current_kl[t]:
                    i = int(torch.nonzero((owner == t) & (kl == best_kl[t]))[0])
                    self.current[t], self.current_kl[t] = cand_ids[i], best_kl[t]
        self.timings["gradient"] += tac - tic
        self.timings["sample"] += toc - tac
        self.timings["score"] += time.perf_counter() - toc
        step_kl = torch.full((T,), math.inf)
        step_kl[active] = self.current_kl[active]
        self.trace.append(torch.where(self.tracker.active, self.current_kl, torch.full((T,), math.nan)))
        self.tracker.update(step_kl, self.n_steps)
        self.n_steps += 1

    def result(self) -> Result:
        """The Result; KL and log-probs from one final exact forward pass of the best prompts."""
        kl, logprobs = _score(self.model, self.head, self.full(self.current), self.every, self.target_probs,
                              self.neg_entropy, self.scorer, keep_logprobs=True)
        T = len(self.targets)
        exact, texts = self.frame.text_reproduces(self.current.tolist())  # all True with retokenize_filter
        return Result(
            method="hard",
            target_ids=self.targets.ids,
            kl=kl.cpu(),
            initial_kl=self.initial_kl,
            logprobs=logprobs.cpu(),
            steps=self.tracker.steps.clone(),
            trace=torch.stack(self.trace) if self.trace else torch.empty(0, T),
            wall_s=time.perf_counter() - self.t0,
            prompt_ids=self.current.clone(),
            prompt_text=[t if ok else None for t, ok in zip(texts, exact, strict=True)],
            meta={"config": dataclasses.asdict(self.config), "is_bound": False,
                  "candidate_batch": self.scorer.size, "n_scored": self.n_scored,
                  "timings_s": dict(self.timings)},
        )


def optimize_hard(model, tokenizer, targets: Targets, config: HardConfig | None = None, *,
                  progress: bool = True, callback=None) -> Result:
    """Find L real tokens per target minimising KL(target ‖ model's next-token distribution).

    model, tokenizer: a frozen causal LM (float32 on CPU; bf16 works on CUDA, losses stay float32).
    targets: T targets over the model's logits width (checked before any compute).
    config: HardConfig (default HardConfig()).
    callback: None, or `callback(step, best_kl) -> bool`, called after every search step with `step`
    the steps done (1, 2, ...) and `best_kl` the mean over targets of each one's best KL so far
    (nats); returning True stops the search, which returns the best prompts so far.
    Returns a Result with method "hard": prompt_ids (T, L) best tokens, prompt_text (T decoded
    prompts; with the filter on, each re-tokenises to its ids), kl (T,) best KL in nats,
    initial_kl (T,), logprobs (T, vocab) at the best prompt, steps (T,), trace (n_steps, T) current
    KL after each step (NaN once stopped), meta {"config", "is_bound": False, "candidate_batch"
    (the final, possibly backed-off, chunk size), "n_scored" (candidates scored), "timings_s"}.
    """
    config = HardConfig() if config is None else config
    if not isinstance(config, HardConfig):
        raise TypeError(f"optimize_hard needs a HardConfig, got {type(config).__name__}; "
                        "build one with dplib.optim.HardConfig(...).")
    search = HardSearch(model, tokenizer, targets, config)
    with tqdm(total=search.config.steps, desc="hard", disable=not progress, leave=False) as bar:
        while not search.done:
            search.step()
            bar.update(1)
            bar.set_postfix(kl=f"{float(search.current_kl.mean()):.4f}",
                            active=int(search.tracker.active.sum()))
            if callback is not None and callback(search.n_steps, float(search.current_kl.mean())):
                break
        bar.update(bar.total - bar.n)  # stopped early: end the bar complete, not in tqdm's error colour
    return search.result()

"""Hard prompts: L real tokens found by gradient-guided coordinate search, toward full distributions.

The HotFlip / AutoPrompt / GCG family, batched over T targets. Each target's search stands on one
prompt (`current`) and keeps the best prompt it has seen (`best`, what is returned). One step, for
every target still running:

1. **Rank replacements by the gradient.** The KL of all T targets is summed and differentiated in
   one backward pass with respect to the current prompts' input embeddings (T, L, d_model);
   multiplying by the embedding matrix, `grad @ Eᵀ`, gives the gradient with respect to the one-hot
   token matrix (T, L, vocab) — the same numbers as differentiating a one-hot matmul, and 10-24 %
   faster on CPU. Disallowed tokens (special tokens, padding rows, optionally non-ASCII) are masked
   out; the `top_k` most negative entries per position are the replacement candidates.
2. **Propose B candidates per target**: each swaps `n_swaps` distinct random positions (a count that
   can fall linearly to `n_swaps_end` over the steps: explore early, refine late) to random tokens
   from those positions' top-k. A share `copy_share` of them instead puts, at its first swapped
   position, a token drawn from the *target itself* (with the target's probabilities): LMs copy
   from their context, and a first-order ranking of 49k tokens rarely ranks the target's own tokens
   first. Each target draws from its own seeded generator, derived from (seed, target_id), so a
   target's search does not depend on which others share its batch.
3. **Filter** (`retokenize_filter`, on by default): a candidate survives only if its decoded text
   re-tokenises to exactly its ids — on its own *and* joined with the prefix and suffix text — so
   the reported prompt text means what the optimiser scored. Duplicates are dropped.
4. **Score every surviving candidate exactly** (`optim.scoring`), all targets' candidates together,
   in batched forward passes that read the last position only. A candidate shares with the prompt
   it was made from everything before its first swapped position — the fixed prefix (BOS, a literal
   prefix, the chat template) and the unchanged prompt tokens — so that context is run once per
   batch, its key/value cache gathered over the candidates that follow it, and each candidate runs
   only its own positions from the first swap on: on average about half the prompt
   (`reuse_prefix`; checked against whole sequences when the search starts). Batches are
   `candidate_batch` sequences at most and halve automatically when memory runs out.
5. **Move** (`always_move`, as GCG): the search stands on the step's best candidate even when it is
   worse than the current prompt — a pure descent (always_move=False) stops at the first prompt no
   single swap improves. With `restart_after`, a target that has found no new best for that many
   steps restarts from one of its `buffer_size` best prompts seen. A target that has found no new
   best for `patience` steps stops and is no longer scored.

How a prompt is tokenised is `lm.PromptFrame`'s one rule (the contract `score_prompt_text` checks
from scratch): ids = [BOS if prefix == "bos"] + encode(prefix_text + prompt_text + suffix); with
prefix "chat" the prefix and suffix text are the chat template's rendering around the user message
(`lm.chat_frame`), so the prompt is what the user says and the target is the assistant's first token.
By default (`init="target"`) each search starts from its target's own most probable tokens, the most
probable last (`init="random"`: random allowed tokens). `init_text` starts it from given text instead
(e.g. the best hand-written instruction, one per target, or a soft prompt's nearest tokens:
`init_text=tuple(soft.prompt_text)` where every projection re-tokenises to itself); with
prompt_length=None, L is that text's token count (`optim.hard_init`). The optimiser works on the
segments `[BOS] + encode(prefix_text)`, the L prompt ids and `encode(suffix)`; the filter guarantees
that the whole-string tokenisation equals that concatenation, and the returned prompts are re-scored
as whole sequences, so the decoded
`prompt_text` run through the model from scratch gives the reported KL (up to float noise of
batching, ≪ 1e-4). With the filter off, a prompt whose text does not re-tokenise to its ids is
reported with `prompt_text` None.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import lm
from ..lm import allowed_tokens, embed, logits_width, output_layer
from ..seeds import derive_seed, generator
from ..targets import Targets
from .common import BestTracker, Result
from .hard_config import HardConfig
from .hard_init import initial_prompts, resolve_length
from .scoring import Chunker, score_kl, score_kl_after_shared, score_prompt_text

__all__ = ["HardConfig", "HardSearch", "optimize_hard", "resolve_length", "score_prompt_text"]



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
        logprobs = lm.next_token_logprobs(model, inputs, head=head)
        kl = lm.kl_from_logprobs(target_probs, logprobs, neg_entropy)
        (grad,) = torch.autograd.grad(kl.sum(), prompt_embeds)
    # d loss / d onehot[t, i, v] = s · <grad[t, i], E[v]>
    onehot_grad = (grad.to(emb_weight.dtype) @ emb_weight.T).float()
    if emb_scale != 1.0:
        onehot_grad *= emb_scale
    return onehot_grad, kl.detach()


def _sample_candidates(top: Tensor, current: Tensor, n: int, n_swaps: int, gen: torch.Generator,
                       copy_probs: Tensor | None = None, n_copy: int = 0) -> Tensor:
    """n candidates from one prompt: swap n_swaps distinct positions to tokens from their top-k.

    top: (L, k) replacement tokens per position (CPU); current: (L,). With copy_probs (vocab,) (the
    target's probabilities over allowed tokens), the first n_copy candidates' first swapped position
    takes a token drawn from copy_probs instead. Returns (n, L) ids (CPU).
    """
    L, k = top.shape
    pos = torch.rand(n, L, generator=gen).argsort(dim=1)[:, :n_swaps]  # distinct positions per candidate
    pick = torch.randint(k, (n, n_swaps), generator=gen)
    tokens = top[pos, pick]
    if n_copy and copy_probs is not None:
        tokens[:n_copy, 0] = torch.multinomial(copy_probs, n_copy, replacement=True, generator=gen)
    cands = current.unsqueeze(0).repeat(n, 1)
    cands.scatter_(1, pos, tokens)
    return cands



# Largest |KL after a shared key/value cache − KL of whole sequences| (nats) accepted when a search starts, for
# float32/64 weights and for 16-bit weights (whose rounding differs between the two orders of work).
REUSE_TOLERANCE = {False: 1e-3, True: 5e-2}


class HardSearch:
    """The state of one batched search: current and best prompts, their KL, the tracker, the chunk sizes.

    `optimize_hard` is `HardSearch(...)` then `step()` until done, then `result()`; the benchmarks
    drive `step()` themselves. `timings` accumulates seconds per phase ("gradient", "sample",
    "score") over all steps; `n_scored` counts candidates scored (forward passes, one sequence each).
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
        # (T, L) the prompt each target's search stands on, on CPU; `best` the best seen (what is returned)
        self.current = torch.tensor(initial_prompts(tokenizer, frame, config, allowed, self.gens,
                                                    targets.probs), dtype=torch.long)
        self.best = self.current.clone()

        self.head = output_layer(model)
        self.emb_weight, self.emb_scale = lm.embedding_matrix(model, self.current[0].to(device))
        self.disallowed = (~allowed).to(device)
        self.target_probs = targets.probs.to(device=device, dtype=torch.float32)
        self.neg_entropy = torch.special.xlogy(self.target_probs, self.target_probs).sum(-1)  # (T,) Σ p log p
        # (T, vocab) each target's own allowed tokens with its probabilities, for copy proposals (None: no mass)
        copy = targets.probs.float().cpu() * allowed.cpu()
        self.copy_probs = [row if float(row.sum()) > 0 else None for row in copy]
        self.prefix_ids = torch.tensor(frame.prefix_ids, dtype=torch.long, device=device)
        self.suffix_ids = torch.tensor(frame.suffix_ids, dtype=torch.long, device=device)

        self.scorer = Chunker(config.candidate_batch, "candidate")
        self.grad_chunker = Chunker(config.candidate_batch, "gradient")
        self.every = torch.arange(T, device=device)
        kl, _ = score_kl(model, self.head, self.full(self.current), self.every, self.target_probs,
                       self.neg_entropy, self.scorer)
        self.current_kl = kl.cpu()
        self.initial_kl = self.current_kl.clone()
        self.reuse = config.reuse_prefix and len(self.prefix_ids) + config.prompt_length > 1
        if self.reuse:
            self._check_reuse()
        self.tracker = BestTracker(T, patience=config.patience)
        self.tracker.best = self.initial_kl.clone()
        self.stale = torch.zeros(T, dtype=torch.long)  # steps since each target's last new best
        self.buffer: list[dict[tuple[int, ...], float]] = [{tuple(p): float(k)} for p, k in
                                                           zip(self.current.tolist(), self.current_kl, strict=True)]
        self.trace: list[Tensor] = [self.initial_kl.clone()]
        self.n_scored = 0
        self.n_steps = 0
        self.n_restarts = 0
        self.timings = {"gradient": 0.0, "sample": 0.0, "score": 0.0}

    def _check_reuse(self) -> None:
        """Score the initial prompts after the cache of all but their last token too; refuse a model where it
        disagrees with whole sequences."""
        last = torch.full((len(self.current),), self.config.prompt_length - 1, dtype=torch.long)
        try:
            kl, _ = self.score(self.current, self.every, last.to(self.device))
        except Exception as err:  # noqa: BLE001 - re-raised with what to do
            raise lm.ModelStructureError(
                f"{type(self.model).__name__}: scoring after a shared key/value cache failed ({err!r}); "
                "set HardConfig(reuse_prefix=False) to score whole sequences.") from err
        gap = float((kl.cpu() - self.initial_kl).abs().max())
        if gap > REUSE_TOLERANCE[self.emb_weight.dtype in (torch.float16, torch.bfloat16)]:
            raise lm.ModelStructureError(
                f"{type(self.model).__name__}: KL after a shared key/value cache differs from whole "
                f"sequences by {gap:.2e} nats; set HardConfig(reuse_prefix=False) to score whole sequences.")

    def full(self, prompt_ids: Tensor) -> Tensor:
        """(N, L) prompt ids → (N, P + L + S) model input ids on the model's device."""
        n = len(prompt_ids)
        return torch.cat([self.prefix_ids.expand(n, -1), prompt_ids.to(self.device),
                          self.suffix_ids.expand(n, -1)], dim=1)

    def score(self, prompt_ids: Tensor, owner: Tensor, start: Tensor | None = None) -> tuple[Tensor, None]:
        """KL of (N, L) prompts made from their owners' current prompts, on the device.

        owner: (N,) target index of each; start: (N,) the first position where each may differ from
        `current[owner]` (None: 0). With reuse, each is run after the key/value cache of the prefix and
        `current[owner, :start]`; else as a whole sequence. Returns ((N,) KL, None).
        """
        if not self.reuse:
            return score_kl(self.model, self.head, self.full(prompt_ids), owner, self.target_probs,
                          self.neg_entropy, self.scorer)
        start = torch.zeros_like(owner) if start is None else start
        return score_kl_after_shared(self.model, self.head, self.prefix_ids, self.current.to(self.device),
                                     prompt_ids.to(self.device), start, owner, self.suffix_ids,
                                     self.target_probs, self.neg_entropy, self.scorer), None

    @property
    def done(self) -> bool:
        return self.tracker.done or self.n_steps >= self.config.steps

    def n_swaps(self) -> int:
        """Positions changed per candidate at this step: n_swaps at the first, n_swaps_end at the last."""
        cfg = self.config
        if cfg.n_swaps_end is None or cfg.steps == 1:
            return cfg.n_swaps
        frac = min(1.0, self.n_steps / (cfg.steps - 1))
        return max(1, round(cfg.n_swaps + (cfg.n_swaps_end - cfg.n_swaps) * frac))

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

    def candidates(self, active: Tensor, top: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """B sampled, deduplicated, filtered candidates per active target, on CPU: ids (N, L), owner (N,)
        and start (N,), the first position where each differs from its target's current prompt."""
        cfg = self.config
        swaps, n_copy = self.n_swaps(), round(cfg.copy_share * cfg.n_candidates)
        cand_rows, owners, starts = [], [], []
        for j, t in enumerate(active.tolist()):
            cands = _sample_candidates(top[j], self.current[t], cfg.n_candidates, swaps, self.gens[t],
                                       self.copy_probs[t], n_copy)
            cands = torch.unique(cands, dim=0)  # sorted: the order is a function of the set alone
            if cfg.retokenize_filter:
                ok, _ = self.frame.text_reproduces(cands.tolist())
                cands = cands[torch.tensor(ok, dtype=torch.bool)]
            cand_rows.append(cands)
            owners.append(torch.full((len(cands),), t, dtype=torch.long))
            starts.append((cands != self.current[t]).long().argmax(dim=1))  # 0 where none differs
        return torch.cat(cand_rows), torch.cat(owners), torch.cat(starts)

    def _remember(self, t: int, cands: Tensor, kl: Tensor) -> None:
        """Keep target t's `buffer_size` best distinct prompts seen, for restarts."""
        buf = self.buffer[t]
        keep = kl.argsort()[: self.config.buffer_size]
        for i in keep.tolist():
            buf[tuple(cands[i].tolist())] = float(kl[i])
        if len(buf) > self.config.buffer_size:
            self.buffer[t] = dict(sorted(buf.items(), key=lambda kv: kv[1])[: self.config.buffer_size])

    def _restart(self, t: int) -> None:
        """Move target t's search to a prompt drawn at random from its buffer of best prompts."""
        entries = list(self.buffer[t].items())
        ids, kl = entries[int(torch.randint(len(entries), (1,), generator=self.gens[t]))]
        self.current[t] = torch.tensor(ids, dtype=torch.long)
        self.current_kl[t] = kl
        self.stale[t] = 0
        self.n_restarts += 1

    def step(self) -> None:
        """One search step for every active target."""
        cfg, T = self.config, len(self.targets)
        active = self.tracker.active.nonzero().flatten()
        tic = time.perf_counter()
        top = self.top_tokens(active)
        tac = time.perf_counter()
        cand_ids, owner, start = self.candidates(active, top)
        toc = time.perf_counter()
        if len(cand_ids):
            kl, _ = self.score(cand_ids, owner.to(self.device), start.to(self.device))
            kl = kl.cpu()
            self.n_scored += len(cand_ids)
            for t in active.tolist():
                mine = (owner == t).nonzero().flatten()
                if not len(mine):
                    continue
                i = int(mine[kl[mine].argmin()])
                if cfg.always_move or kl[i] < self.current_kl[t]:
                    self.current[t], self.current_kl[t] = cand_ids[i], kl[i]
                if cfg.restart_after:
                    self._remember(t, cand_ids[mine], kl[mine])
        self.timings["gradient"] += tac - tic
        self.timings["sample"] += toc - tac
        self.timings["score"] += time.perf_counter() - toc
        step_kl = torch.full((T,), math.inf)
        step_kl[active] = self.current_kl[active]
        self.trace.append(torch.where(self.tracker.active, self.current_kl, torch.full((T,), math.nan)))
        improved = self.tracker.update(step_kl, self.n_steps)
        self.best[improved] = self.current[improved]
        self.stale = torch.where(improved, torch.zeros_like(self.stale), self.stale + 1)
        if cfg.restart_after:
            for t in (self.tracker.active & (self.stale >= cfg.restart_after)).nonzero().flatten().tolist():
                self._restart(t)
        self.n_steps += 1

    @property
    def best_kl(self) -> Tensor:
        """(T,) each target's best KL so far, nats."""
        return self.tracker.best

    def result(self) -> Result:
        """The Result; KL and log-probs from one final exact forward pass of the best prompts (whole sequences)."""
        kl, logprobs = score_kl(self.model, self.head, self.full(self.best), self.every, self.target_probs,
                              self.neg_entropy, self.scorer, keep_logprobs=True)
        exact, texts = self.frame.text_reproduces(self.best.tolist())  # all True with retokenize_filter
        return Result(
            method="hard",
            target_ids=self.targets.ids,
            kl=kl.cpu(),
            initial_kl=self.initial_kl,
            logprobs=logprobs.cpu(),
            steps=self.tracker.steps.clone(),
            trace=torch.stack(self.trace),
            wall_s=time.perf_counter() - self.t0,
            prompt_ids=self.best.clone(),
            prompt_text=[t if ok else None for t, ok in zip(texts, exact, strict=True)],
            meta={"config": dataclasses.asdict(self.config), "is_bound": False,
                  "candidate_batch": self.scorer.size, "n_scored": self.n_scored,
                  "n_restarts": self.n_restarts, "timings_s": dict(self.timings)},
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
    initial_kl (T,), logprobs (T, vocab) at the best prompt, steps (T,), trace (n_steps + 1, T) the KL
    of the prompt the search stands on: row 0 the initial prompt, row s after step s (NaN once stopped;
    with always_move it can rise, and kl is its minimum, as for soft prompts), meta {"config", "is_bound": False, "candidate_batch"
    (the final, possibly backed-off, chunk size), "n_scored" (candidates scored), "n_restarts"
    (restarts from the buffer, all targets), "timings_s"}.
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
            bar.set_postfix(kl=f"{float(search.best_kl.mean()):.4f}", active=int(search.tracker.active.sum()))
            if callback is not None and callback(search.n_steps, float(search.best_kl.mean())):
                break
        bar.update(bar.total - bar.n)  # stopped early: end the bar complete, not in tqdm's error colour
    return search.result()

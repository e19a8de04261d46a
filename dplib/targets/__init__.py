"""Target distributions: the `Targets` batch type, one module per kind of target, the vocabulary map.

A target is a probability vector over a model's whole vocabulary — the logits width, which can
exceed `len(tokenizer)` — plus metadata. A batch of T targets is a `Targets`: `probs` (T, vocab),
`entropy` (T,) in nats, and one metadata row per target (`frame()`), whose `target_id` names the
target stably so that per-cell seeds can derive from it.

Samplers (each returns a validated `Targets`):
- `vanilla(vocab_size, entropies, method=...)`: random targets at exact entropies (|H − h| ≤ 1e-6).
- `outliers(vocab_size, entropy, k, mass)`: k tokens sharing mass m, the rest tempered to exact h.
- `from_model(model, tokenizer, n)`: a model's next-token distributions at seeded corpus positions.
- `reference(model, tokenizer, contexts)`: a model's distribution after given contexts (KL 0 reachable).
- `map_vocab(targets, source_tokenizer, target_tokenizer, width)`: string-level move across tokenizers.

Modules, each with one job (a module imports only from those above it):
- `batch`: `Targets`, `TargetError`, `validate_probs`.
- `tempering`: softmax(β z) at an exact entropy; the entropy checks and storage rule samplers share.
- `random_targets`: `vanilla`, `entropy_grid`.
- `outlier_targets`: `outliers`, `feasible_masses`.
- `lm_targets`: `from_model`, `reference`, `next_token_probs`.
- `tokenizer_bytes`: each token's raw bytes, a tokenizer's fingerprint (what the map reads).
- `vocabulary`: `vocab_map`, `VocabMap`, `map_vocab`.

Shortcuts taken: random targets spread mass over every row of the width they are given, padding
rows included (pass `logits_width(model)`); LM and reference targets keep whatever mass the model
puts on its padding rows, because they must stay the model's own distributions.
"""

# _token_bytes and _MAPS are private names other code reads through this package: dplib.answers
# reads token bytes, and benchmarks/targets_build.py clears the in-memory map cache (to patch the
# cache, patch dplib.targets.vocabulary._MAPS).
from ..lm import logits_width
from .batch import SUM_TOLERANCE, TargetError, Targets, validate_probs
from .lm_targets import from_model, next_token_probs, reference
from .outlier_targets import OUTLIER_MARGIN, feasible_masses, outliers
from .random_targets import VANILLA_METHODS, entropy_grid, vanilla
from .tempering import ENTROPY_TOLERANCE, SOLVER_TOLERANCE
from .tokenizer_bytes import _token_bytes as _token_bytes
from .vocabulary import _MAPS as _MAPS
from .vocabulary import MAP_METHODS, VocabMap, map_vocab, vocab_map

__all__ = [
    "ENTROPY_TOLERANCE", "MAP_METHODS", "OUTLIER_MARGIN", "SOLVER_TOLERANCE", "SUM_TOLERANCE", "VANILLA_METHODS",
    "TargetError", "Targets", "VocabMap", "entropy_grid", "feasible_masses", "from_model", "logits_width",
    "map_vocab", "next_token_probs", "outliers", "reference", "validate_probs", "vanilla", "vocab_map",
]

"""Optimisers: find the prompt whose next-token distribution is closest to each target.

Every optimiser has one signature, `optimize_<method>(model, tokenizer, targets, config, *,
progress=True) -> Result`, optimises all T targets as one batch, and reads logits at the last
position only.
"""

from ..lm import OutputLayer, next_token_logprobs, output_layer
from .bound import BoundConfig, LayerBoundConfig, free_bound, layer_bound, norm_bound
from .common import BestTracker, Result
from .hard import HardConfig, optimize_hard, score_prompt_text
from .soft import SoftConfig, optimize_soft

# The runner looks methods up by name (the name becomes the `method` column) and builds their
# configs with CONFIGS[name](**params). Adding a method is one line in each dict.
METHODS = {
    "soft": optimize_soft,
    "hard": optimize_hard,
    "free_bound": free_bound,
    "norm_bound": norm_bound,
    "layer_bound": layer_bound,
}
CONFIGS = {
    "soft": SoftConfig,
    "hard": HardConfig,
    "free_bound": BoundConfig,
    "norm_bound": BoundConfig,
    "layer_bound": LayerBoundConfig,
}

# The methods whose KL bounds every prompt's from below (the output layer alone: free, or norm-constrained); their
# rows are drawn as bound lines. Not layer_bound: found by Adam through the upper layers, its optimum is local.
BOUNDS = frozenset({"free_bound", "norm_bound"})

# A method's revision: bump it when the method's results change for the same config (a new algorithm, not a new
# knob), so that the cell store recomputes cells of older revisions instead of serving them. Absent = 1.
# hard 2: candidates scored after the cache of the prompt tokens they share with their prompt (float rounding
# differs, so the search's path can differ).
REVISIONS = {"hard": 2}

__all__ = ["BOUNDS", "CONFIGS", "METHODS", "REVISIONS", "BestTracker", "BoundConfig", "LayerBoundConfig", "OutputLayer", "Result",
           "SoftConfig", "HardConfig", "optimize_hard", "score_prompt_text", "free_bound", "layer_bound",
           "next_token_logprobs", "norm_bound", "optimize_soft", "output_layer"]

"""Optimisers: find the prompt whose next-token distribution is closest to each target.

Every optimiser has one signature, `optimize_<method>(model, tokenizer, targets, config, *,
progress=True) -> Result`, optimises all T targets as one batch, and reads logits at the last
position only.
"""

from .common import BestTracker, OutputLayer, Result, next_token_logprobs, output_layer

__all__ = ["BestTracker", "OutputLayer", "Result", "next_token_logprobs", "output_layer"]

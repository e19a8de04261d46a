"""dplib: distribution prompting for causal language models."""

"""dplib: distribution prompting for causal language models.

The public API, re-exported: `load_model`, `list_models`, `Targets`, the modules `targets`,
`metrics`, `optim` (and, where present, `runner`, `results`, `plotting`).
"""

from . import metrics, optim, targets
from .models import (
    ModelLoadError,
    list_models,
    load_model,
    resolve_device,
    resolve_dtype,
    tiny_model,
)
from .seeds import derive_seed, seed_everything
from .targets import TargetError, Targets, logits_width

__version__ = "0.1.0"

__all__ = [
    "ModelLoadError", "TargetError", "Targets", "derive_seed", "list_models", "load_model",
    "logits_width", "metrics", "optim", "resolve_device", "resolve_dtype", "seed_everything", "targets",
    "tiny_model",
]

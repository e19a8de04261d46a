"""dplib: distribution prompting for causal language models.

The public API, re-exported: `load_model`, `list_models`, `Targets`, the modules `lm` (what dplib
reads from a model, and `lm.configure` to supply what it cannot find), `targets`, `metrics`, `optim` (and, where present, `runner`, `results`, `plotting`).
"""

from . import lm, metrics, targets
from .models import (
    ModelLoadError,
    list_models,
    load_model,
    resolve_device,
    resolve_dtype,
    tiny_model,
)
from .seeds import derive_seed
from .targets import TargetError, Targets, logits_width

__version__ = "0.1.0"


def __getattr__(name: str):
    # `dplib.optim` pulls in SciPy: import it on first use, so `import dplib` stays quick.
    if name == "optim":
        import importlib

        return importlib.import_module(".optim", __name__)
    raise AttributeError(f"module 'dplib' has no attribute {name!r}")


__all__ = [
    "ModelLoadError", "TargetError", "Targets", "derive_seed", "list_models", "load_model",
    "lm", "logits_width", "metrics", "optim", "resolve_device", "resolve_dtype", "targets",
    "tiny_model",
]

"""Helpers shared by the tests: target builders, a hang guard (imported as `helpers`; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import pandas as pd
import torch

from dplib.targets import Targets


def own_distribution(model, tok, texts, n_tokens) -> Targets:
    """The model's next-token distributions after BOS + the first n_tokens of each text (reachable)."""
    rows = []
    with torch.no_grad():
        for text in texts:
            ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"][:n_tokens]
            rows.append(model(torch.tensor([ids])).logits[0, -1].float().softmax(-1))
    return Targets(torch.stack(rows), pd.DataFrame({"kind": ["own"] * len(rows)}))


def random_targets(width, n, seed=0, temperature=1.0, dtype=torch.float32) -> Targets:
    """n softmaxes of Gaussian logits (scaled by `temperature`) over `width` tokens."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(n, width, generator=g, dtype=dtype) * temperature, -1)
    return Targets(probs, pd.DataFrame({"kind": ["random"] * n}))


def in_thread(fn, timeout=60.0) -> dict:
    """Run fn() in a daemon thread, failing the test if it is still running after `timeout` s (a hang).

    Returns {"value": its result} or {"error": the exception it raised}.
    """
    import threading

    out = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - handed to the test
            out["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"still running after {timeout} s: it hangs"
    return out


def attr_path(obj, path: str):
    """obj.a.b.c for path "a.b.c" (where a family keeps its final norm or its layers)."""
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


def missing_as_none(df: pd.DataFrame) -> pd.DataFrame:
    """Missing values as None, every column object: a table read back from CSV has NaN for None and
    cannot tell an empty string from a missing one, so compare tables in this form."""
    df = df.astype(object)
    return df.where(df.notna() & (df != ""), None)

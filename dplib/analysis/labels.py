"""Tables for reading results: token labels, the top-token table `plotting.distributions` draws, the
soft prompt's projection rows and note, and target-group labels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from .stats import _need


def token_label(tokenizer, token_id: int) -> str:
    """A readable label for one token: its decoded text with whitespace made visible."""
    try:
        text = tokenizer.decode([int(token_id)])
    except Exception:  # padding rows beyond the tokenizer have no string
        text = ""
    if text == "":
        return f"<{int(token_id)}>"
    return repr(text)[1:-1].replace(" ", "␣")


def top_tokens(target_probs, achieved: Mapping[str, object], tokenizer=None, *, n: int = 10,
               target_ids: Sequence[str] | None = None, by: str = "target") -> pd.DataFrame:
    """The top-n tokens of each target with target and achieved probabilities, in long form.

    Args:
        target_probs: (T, vocab) target probabilities (a Tensor, array, or `Targets`).
        achieved: {label: (T, vocab) model log-probabilities or a Result (its `.logprobs`)}.
        tokenizer: decodes token ids to labels (None: ids only).
        n: tokens per target.
        by: "target" ranks the target's top tokens; "union" also adds each method's top tokens.
    Returns: columns target_id, rank, token_id, token, source ("target" or the label),
        prob — one row per (target, token, source); rank is the token's rank under the target.
    """
    import torch  # analysis may use torch; plotting never does

    if hasattr(target_probs, "probs"):
        target_ids = target_ids or target_probs.ids
        target_probs = target_probs.probs
    p = torch.as_tensor(target_probs).double()
    logq = {k: torch.as_tensor(getattr(v, "logprobs", v)).double() for k, v in achieved.items()}
    target_ids = list(target_ids) if target_ids is not None else [str(i) for i in range(len(p))]
    rows = []
    for i, tid in enumerate(target_ids):
        order = torch.argsort(p[i], descending=True)
        chosen = order[:n].tolist()
        if by == "union":
            for lq in logq.values():
                chosen += [t for t in lq[i].topk(n).indices.tolist() if t not in chosen]
        rank_of = {int(t): r for r, t in enumerate(order.tolist()[: max(len(chosen) * 4, n)])}
        for t in chosen:
            label = token_label(tokenizer, t) if tokenizer is not None else str(t)
            rank = rank_of.get(int(t), int((p[i] > p[i, t]).sum()))
            rows.append({"target_id": tid, "rank": rank, "token_id": int(t), "token": label,
                         "source": "target", "prob": float(p[i, t])})
            for name, lq in logq.items():
                rows.append({"target_id": tid, "rank": rank, "token_id": int(t), "token": label,
                             "source": name, "prob": float(lq[i, t].exp())})
    return pd.DataFrame(rows, columns=["target_id", "rank", "token_id", "token", "source", "prob"])


def with_projection(df: pd.DataFrame, *, method: str = "soft", label: str = "soft_projected") -> pd.DataFrame:
    """The table plus one row per `method` row scored after nearest-token projection.

    The soft optimiser reports, next to its KL, `projected_kl_nats`: the KL of the prompt made of
    the real tokens nearest to its vectors. The added rows are copies of the `method` rows with
    kl_nats = projected_kl_nats, `method` and `variant` (where present) set to `label` (the variant
    keeps any suffix after the method name: "soft_L5" → "soft_projected_L5") and is_bound False;
    rows without a projection (NaN) are not added.
    """
    _need(df, ["method", "kl_nats", "projected_kl_nats"], "with_projection")
    src = df[(df["method"] == method) & df["projected_kl_nats"].notna()]
    proj = src.assign(method=label, kl_nats=src["projected_kl_nats"])
    if "variant" in proj:
        proj["variant"] = [label + v[len(method):] if isinstance(v, str) and v.startswith(method) else label
                           for v in proj["variant"]]
    if "is_bound" in proj:
        proj["is_bound"] = False
    return pd.concat([df, proj], ignore_index=True)


def target_group(df: pd.DataFrame, columns: Mapping[str, str] | None = None) -> pd.Series:
    """A readable group label per row: the target `kind`, then `name=value` for each of `columns`
    the row has (non-null), e.g. "vanilla", "outlier k=3 m=0.5".

    columns: {column: short name}; default {"k": "k", "mass": "m"} (the outlier settings).
    """
    columns = {"k": "k", "mass": "m"} if columns is None else dict(columns)
    _need(df, ["kind"], "target_group")
    present = [c for c in columns if c in df]
    labels = []
    for row in df[["kind", *present]].itertuples(index=False):
        parts = [str(row[0])]
        for name, v in zip(present, row[1:], strict=True):
            if v is not None and not (isinstance(v, float) and np.isnan(v)):
                parts.append(f"{columns[name]}={v:g}" if isinstance(v, int | float | np.number) else f"{columns[name]}={v}")
        labels.append(" ".join(parts))
    return pd.Series(labels, index=df.index, name="group")


def projection_note(result, index: int = 0) -> str:
    """What a soft prompt's nearest-token projection is, in words, for target `index` of `result`.

    The projection replaces each of the L soft vectors by the allowed token whose embedding is
    nearest (L2); the KL it reaches is usually far above the vectors' own. When the projected tokens
    are the prompt's initial tokens (meta "init_ids"), the note says so: each vector stayed nearer its
    starting token than any other, so the projection reaches the initial KL — not a failure of the
    optimiser, whose result is the vectors themselves.
    """
    if result.method != "soft" or result.prompt_ids is None or result.projected_kl is None:
        raise ValueError(f"projection_note needs a soft Result with its projection (SoftConfig(project=True)); "
                         f"got method {result.method!r}"
                         f"{' without a projection' if result.method == 'soft' else ''}.")
    ids = result.prompt_ids[index].tolist()
    text = result.prompt_text[index] if result.prompt_text is not None else None
    shown = repr(text) if text is not None else "(no text re-tokenises to exactly these ids)"
    soft_kl, projected_kl = float(result.kl[index]), float(result.projected_kl[index])
    note = (f"The soft prompt is {len(ids)} free vectors, not tokens. Its projection replaces each vector by "
            f"the nearest real token (L2 in the embedding space): ids {ids}, text {shown}. The vectors reach "
            f"KL {soft_kl:.4f} nats; the projected tokens {projected_kl:.4f} nats.")
    init = result.meta.get("init_ids")
    if init is not None and list(init[index]) == ids:
        # the kept restart's initial tokens: its initial KL is the projected KL (result.initial_kl is the
        # lowest over restarts, which may be another restart's)
        note += (" These are the prompt's initial tokens, so the projection reaches the initial prompt's KL: "
                 "each vector ended nearer its starting token than any other token, and rounding to tokens "
                 "undoes the optimisation. The soft prompt's result is the vectors' KL.")
    return note

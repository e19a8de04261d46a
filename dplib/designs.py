"""Experiment designs: which targets a notebook builds, as functions rather than notebook code.

Three choices the notebooks used to make inline, each now one call:

- `feasible_entropies`: the grid points at which an outlier setting (k tokens sharing mass m) exists
  (notebooks 02 and 05 build outlier targets only there);
- `first_per_entropy`: the subset of a grid's targets that also gets the expensive method (hard
  prompts in 01 and 04: the first n targets at each requested entropy);
- `with_matched_controls`: LM targets labelled by source, each with one vanilla control at exactly its
  realised entropy, tied to it by `pair_id` (notebook 03's paired comparison).

These only select and label targets that `dplib.targets` builds; they hold no numerics of their own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd

from . import targets as T


def feasible_entropies(vocab_size: int, entropies: Sequence[float], k: int, mass: float) -> list[float]:
    """The entropies (nats, in order, repeats kept) at which k outlier tokens of total mass `mass`
    are feasible on a vocabulary of `vocab_size` (`targets.feasible_masses` contains `mass`).

    `targets.outliers` raises on an infeasible (h, k, m); this is the filter that keeps a grid to the
    points where the setting exists, so the vanilla baseline and the outlier group can be compared
    at the points they share.
    """
    return [float(h) for h in entropies
            if any(lo <= mass <= hi for lo, hi in T.feasible_masses(vocab_size, float(h), k))]


def first_per_entropy(batch: T.Targets, n: int, *, column: str = "requested_entropy_nats") -> T.Targets:
    """The first `n` targets at each distinct value of `column` (the requested entropy), in batch order.

    On a grid built as `entropy_grid(...).repeat_interleave(per_point)`, this is the first n of each
    grid point's targets: the subset that also gets hard prompts. Raises if the batch lacks `column`
    or n < 1 (a batch of targets is never empty); a grid point with fewer than n targets contributes
    all of them.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"first_per_entropy: n must be an int ≥ 1, got {n!r}")
    if column not in batch.meta:
        raise KeyError(f"first_per_entropy: the targets' metadata has no column {column!r} "
                       f"(have {list(batch.meta.columns)}); build them with targets.vanilla or targets.outliers")
    rank = batch.meta.groupby(column, sort=False).cumcount().to_numpy()
    return batch[[i for i in range(len(batch)) if rank[i] < n]]


def with_matched_controls(sources: Mapping[str, T.Targets], vocab_size: int, *, seed: int,
                          control: str = "random") -> T.Targets:
    """LM targets by source, plus one vanilla control per LM target at exactly its realised entropy.

    Args:
        sources: {source label: Targets}, e.g. {"own": from_model(...), "mapped": map_vocab(...)}; each
            target gets `source` = its label and `pair_id` = its target id.
        vocab_size: the width of the controls (the prompted model's logits width).
        seed: the controls' seed (`targets.vanilla(..., seed=seed)` over every LM target's entropy, in
            order of `sources`).
        control: the controls' `source` label.
    Returns: one batch: the LM targets in order of `sources`, then the controls, whose `pair_id` is
        their LM target's id (so `analysis.paired_comparison(..., pair="pair_id")` pairs them).
    Raises ValueError if two LM targets share a target id (their controls could not be told apart).
    """
    if not sources:
        raise ValueError("with_matched_controls: no LM targets given")
    labelled = [T.Targets(batch.probs, batch.meta.assign(source=name, pair_id=batch.ids))
                for name, batch in sources.items()]
    pair_ids = [i for batch in labelled for i in batch.ids]
    repeated = pd.Index(pair_ids)[pd.Index(pair_ids).duplicated()].unique().tolist()
    if repeated:
        raise ValueError(f"with_matched_controls: target ids {repeated[:3]} occur in more than one source; "
                         "give each source's targets distinct ids")
    entropies = [float(h) for batch in labelled for h in batch.entropy.tolist()]
    controls = T.vanilla(vocab_size, entropies, seed=seed)
    controls = T.Targets(controls.probs, controls.meta.assign(source=control, pair_id=pair_ids))
    return T.Targets.concat([*labelled, controls])

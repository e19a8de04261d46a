"""Tidy-table summaries for the notebooks: statistics with uncertainty, the bottleneck hierarchy, token tables.

Tables in, tables out; nothing here plots. The parts, bottom to top:

- `stats`: entropy bins (`bin_edges`, `bin_index`: the one binning rule, used by findings and plots too); `grouped`; `bootstrap_interval`, the one percentile bootstrap, seeded per group with
  `group_seed(seed, key)` so that a group's interval depends on its own rows only; `bin_summary`
  (one row per group and entropy bin: mean, standard error, interval); `matched_difference` and
  `paired_comparison` (matched groups, paired methods); `group_summary`; `ratio_of_means`.
- `hierarchy`: the bottleneck hierarchy of notebook 05 (`hierarchy`, `ordering_violations`,
  `hierarchy_parts`, `with_bound_gap`).
- `labels`: `token_label`, `top_tokens` (the long table `plotting.distributions` draws),
  `with_projection` / `projection_note` (the soft prompt's nearest-token projection), `target_group`.
"""

from .hierarchy import HIERARCHY, hierarchy, hierarchy_parts, ordering_violations, with_bound_gap
from .labels import projection_note, target_group, token_label, top_tokens, with_projection
from .stats import (
    bin_edges,
    bin_index,
    bin_summary,
    bootstrap_ci,
    bootstrap_interval,
    entropy_bins,
    group_seed,
    group_summary,
    grouped,
    matched_difference,
    paired_comparison,
    pivot_bins,
    ratio_of_means,
)

__all__ = [
    "HIERARCHY", "bin_edges", "bin_index", "bin_summary", "bootstrap_ci", "bootstrap_interval", "entropy_bins", "group_seed", "group_summary",
    "grouped",     "hierarchy", "hierarchy_parts", "matched_difference", "ordering_violations", "paired_comparison", "pivot_bins",
    "projection_note", "ratio_of_means", "target_group", "token_label", "top_tokens", "with_bound_gap",
    "with_projection",
]

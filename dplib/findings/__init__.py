"""The study's verdicts, computed from results tables, and the prose that states them.

Each verdict function takes a tidy results table (the one a notebook saves as `tables/results.csv`)
and returns verdict rows with one schema (`COLUMNS`):

    claim      the claim in words, the same for every row of one verdict function
    scope      which part of the table the row judges ("smollm2-135m · soft", "L = 5", "bin 1.8–3.6 nats")
    statistic  what `value` is, with its unit
    value      the statistic on the table; ci_low, ci_high its percentile-bootstrap interval at `level`
    n          the targets (or pairs, or tasks) the statistic is computed from
    null       the value at which the claim would be false ... or not yet shown
    direction  "greater": the claim says value > null; "less": value < null
    verdict    "holds"     the whole interval lies on the claim's side of `null`
               "fails"     the whole interval lies on the other side (the opposite holds)
               "undecided" the interval contains `null`, or a group has fewer than `min_n` rows
                           (default 3: a percentile bootstrap of one row has no spread, and of two rows
                           its interval is just their range, far too narrow to judge by)
    headline   True for the rows a reader needs first (the index shows these); False for detail rows
               (per entropy bin)
    note       the supporting numbers in words, and why a row is undecided

Every interval comes from `analysis.bootstrap_interval`, seeded per group, so the verdicts and the
notebook's own tables agree. Inputs are checked: a missing column, an empty table or a group the
verdict needs that has no rows is an error naming it, never a silent NaN.

`prose(verdicts)` renders the rows as a short markdown paragraph (every number in it comes from the
rows); `show(verdicts)` displays that paragraph and the table in a notebook.

The parts: `rows` (the row schema, `decide`, the claims' wording, input checks), `claims` (the verdict
functions), `text` (prose and display).
"""

from .claims import (
    bound_share,
    entropy_hump,
    hard_vs_soft,
    lm_targets_easier,
    outliers_easier,
    proposers_beat_instructions,
)
from .rows import (
    BOUND_SHARE,
    COLUMNS,
    HUMP_HIGH,
    HUMP_LOW,
    LM_TARGETS,
    OUTLIERS,
    PAIRED_CLAIMS,
    PROPOSERS,
    VERDICTS,
    decide,
    scope_label,
)
from .text import combine, interval, prose, sentence, show

__all__ = [
    "BOUND_SHARE", "COLUMNS", "HUMP_HIGH", "HUMP_LOW", "LM_TARGETS", "OUTLIERS", "PAIRED_CLAIMS", "PROPOSERS",
    "VERDICTS", "bound_share", "combine", "decide", "entropy_hump", "hard_vs_soft", "interval", "lm_targets_easier",
    "outliers_easier", "proposers_beat_instructions", "prose", "scope_label", "sentence", "show",
]

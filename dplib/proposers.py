"""LLMs as distribution proposers: hand-written instructions against optimised prompts, per task.

A *task* is a distribution over answer strings ("roll a fair die": {"1": 1/6, ..., "6": 1/6}) and a
few hand-written instructions for it. This module runs the comparison the 06 notebook reports, on
targets built by `answers.answer_targets`, all in one prompt frame (by default the chat template):

- `instruction_baselines`: every instruction scored as it is (next-token KL and the string-level
  scores of `answers.score_strings`);
- `best_instructions`: the best instruction per task (lowest next-token KL: the quantity the hard
  search then lowers);
- `warm_started_hard`: hard prompts started from those instructions' tokens (one search per distinct
  token count, since a batch shares one prompt length);
- `compare`: one tidy table over methods (instructions, hard, soft, the free-h bound) and one of the
  induced answer distributions, in the form `plotting.distributions` draws;
- `run`: all of the above on one model (what the notebook calls).

It orchestrates library calls and computes nothing of its own: KLs come from the optimisers and
`score_prompt_text`, string probabilities from `answers`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence

import pandas as pd

from . import answers
from .optim import (
    BoundConfig,
    HardConfig,
    SoftConfig,
    free_bound,
    optimize_hard,
    optimize_soft,
    score_prompt_text,
)
from .optim.common import Result
from .targets import Targets

__all__ = ["best_instructions", "compare", "instruction_baselines", "run", "warm_started_hard"]

STRING_COLUMNS = ("kl_answers_nats", "mass_outside", "mass_other_forms")


def instruction_baselines(model, tokenizer, targets: Targets, instructions: Mapping[str, Sequence[str]], *,
                          prefix: str = "chat", suffix: str = "", stop="word") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Score hand-written instructions on answer targets, as they are.

    instructions: {task: [instruction text, ...]} for every task of `targets` (meta "task").
    Returns (summary, distributions): summary has one row per target × instruction: target_id, task,
    method "instruction", instruction (its index), prompt_text, kl_nats (next-token KL of the
    instruction in the frame, `score_prompt_text`), kl_answers_nats, mass_outside, mass_other_forms;
    distributions one row per target × instruction × answer (`answers.score_prompts` columns).
    """
    tasks = targets.meta["task"].tolist()
    missing = [t for t in tasks if not instructions.get(t)]
    if missing:
        raise ValueError(f"no instructions for tasks {missing}; give at least one text per task.")
    rows, dists = [], []
    for i, task in enumerate(tasks):
        target = targets[[i]]
        for k, text in enumerate(instructions[task]):
            kl, _ = score_prompt_text(model, tokenizer, [text], target, prefix=prefix, suffix=suffix)
            dist = answers.score_prompts(model, tokenizer, [text], target, prefix=prefix, suffix=suffix,
                                         stop=stop, method="instruction").assign(instruction=k)
            dists.append(dist)
            rows.append({"target_id": target.ids[0], "task": task, "method": "instruction", "instruction": k,
                         "prompt_text": text, "kl_nats": float(kl[0]),
                         **{c: float(dist[c].iloc[0]) for c in STRING_COLUMNS}})
    return pd.DataFrame(rows), pd.concat(dists, ignore_index=True)


def best_instructions(summary: pd.DataFrame, by: str = "kl_nats") -> dict[str, str]:
    """{target_id: the text of its instruction with the lowest `by`} from `instruction_baselines`."""
    best = summary.loc[summary.groupby("target_id", sort=False)[by].idxmin()]
    return dict(zip(best["target_id"], best["prompt_text"], strict=True))


def warm_started_hard(model, tokenizer, targets: Targets, texts: Mapping[str, str], config: HardConfig, *,
                      progress: bool = True) -> list[Result]:
    """Hard prompts started from given texts (one per target, e.g. `best_instructions`), L = each text's
    token count: targets whose texts share a token count run as one batch; returns one Result per batch
    (in order of first appearance). `config.prompt_length` and `config.init_text` are overridden."""
    missing = [t for t in targets.ids if t not in texts]
    if missing:
        raise ValueError(f"no start text for targets {missing}; give one text per target id.")
    groups: dict[int, list[int]] = {}
    for i, tid in enumerate(targets.ids):
        groups.setdefault(len(tokenizer.encode(texts[tid], add_special_tokens=False)), []).append(i)
    results = []
    for rows in groups.values():
        cfg = dataclasses.replace(config, prompt_length=None,
                                  init_text=tuple(texts[targets.ids[i]] for i in rows))
        results.append(optimize_hard(model, tokenizer, targets[rows], cfg, progress=progress))
    return results


def compare(model, tokenizer, targets: Targets, results: Sequence[Result], baselines: pd.DataFrame,
            baseline_distributions: pd.DataFrame, *, stop="word") -> tuple[pd.DataFrame, pd.DataFrame]:
    """One table over methods, and the induced answer distributions for the figure.

    results: optimiser Results on (subsets of) `targets` (hard and soft are scored at string level in
        their own frame, `answers.score_result`; bounds have no prompt, so their string columns are NaN).
    baselines, baseline_distributions: `instruction_baselines`' output; the best instruction per target
        (lowest kl_nats) is the "instruction" method.
    Returns (summary, distributions): summary one row per target × method: target_id, task, method,
    kl_nats, kl_answers_nats, mass_outside, mass_other_forms, prompt_text; distributions one row per
    target × source × answer (plus "(outside)"): target_id, token, source ("target" or the method),
    prob, rank — the layout `plotting.distributions` draws.
    """
    best = baselines.loc[baselines.groupby("target_id", sort=False)["kl_nats"].idxmin()]
    summary = [best[["target_id", "task", "method", "kl_nats", *STRING_COLUMNS, "prompt_text"]]]
    dists = [baseline_distributions.merge(best[["target_id", "instruction"]], on=["target_id", "instruction"])]
    tasks = dict(zip(targets.ids, targets.meta["task"], strict=True))
    for result in results:
        sub = targets[[targets.ids.index(t) for t in result.target_ids]]
        frame = result.to_frame()
        frame.insert(1, "task", [tasks[t] for t in frame["target_id"]])
        if result.method in ("soft", "hard"):
            dist = answers.score_result(model, tokenizer, result, sub, stop=stop)
            per_target = dist.groupby("target_id", sort=False)[list(STRING_COLUMNS)].first()
            frame = frame.join(per_target, on="target_id")
            dists.append(dist)
        summary.append(frame.reindex(columns=["target_id", "task", "method", "kl_nats", *STRING_COLUMNS,
                                              "prompt_text"]))
    summary = pd.concat(summary, ignore_index=True)
    return summary, _distribution_rows(targets, pd.concat(dists, ignore_index=True))


def _distribution_rows(targets: Targets, dist: pd.DataFrame) -> pd.DataFrame:
    """answers.score_prompts rows → target_id, token, source, prob, rank (target first, then methods)."""
    rows = []
    for tid, answer_json in zip(targets.ids, targets.meta["answers"], strict=True):
        dist_of = json.loads(answer_json)
        for rank, (answer, p) in enumerate(dist_of.items()):
            rows.append({"target_id": tid, "token": answer, "source": "target", "prob": p, "rank": rank})
        rows.append({"target_id": tid, "token": "(outside)", "source": "target", "prob": 0.0, "rank": len(dist_of)})
    order = {(r["target_id"], r["token"]): r["rank"] for r in rows}
    for (tid, method), part in dist.groupby(["target_id", "method"], sort=False):
        for answer, p in zip(part["answer"], part["model_prob"], strict=True):
            rows.append({"target_id": tid, "token": answer, "source": method, "prob": p,
                         "rank": order[(tid, answer)]})
        rows.append({"target_id": tid, "token": "(outside)", "source": method, "prob": part["mass_outside"].iloc[0],
                     "rank": order[(tid, "(outside)")]})
    return pd.DataFrame(rows)


def run(model, tokenizer, tasks: Mapping[str, Mapping[str, float]], instructions: Mapping[str, Sequence[str]], *,
        prefix: str = "chat", suffix: str = "", hard: HardConfig, soft: SoftConfig,
        bound: BoundConfig | None = None, stop="word", progress: bool = True
        ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The whole comparison on one model: answer targets, instructions, hard prompts warm-started from the
    best instruction, soft prompts, the free-h bound, then `compare`.

    hard, soft: their configs (prefix and suffix are set to this frame's; hard's init_text and
    prompt_length come from the best instructions). bound: the free-h bound's config (None = defaults).
    Returns (summary, distributions, baselines): `compare`'s two tables and every instruction's row.
    """
    targets = answers.answer_targets(model, tokenizer, tasks, prefix=prefix, suffix=suffix)
    baselines, baseline_dist = instruction_baselines(model, tokenizer, targets, instructions, prefix=prefix,
                                                     suffix=suffix, stop=stop)
    framed = {"prefix": prefix, "suffix": suffix}
    hard_results = warm_started_hard(model, tokenizer, targets, best_instructions(baselines),
                                     dataclasses.replace(hard, **framed), progress=progress)
    soft_result = optimize_soft(model, tokenizer, targets, dataclasses.replace(soft, **framed), progress=progress)
    bound_result = free_bound(model, tokenizer, targets, bound, progress=progress)
    summary, dist = compare(model, tokenizer, targets, [*hard_results, soft_result, bound_result], baselines,
                            baseline_dist, stop=stop)
    return summary, dist, baselines

"""Notebooks: the committed-notebook contract, `reproduce` (failure report, index), and every
notebook executed under papermill with its smoke parameters (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from dplib import notebooks, results

NOTEBOOKS = notebooks.list_notebooks()
REQUIRED = ["run_id", "model", "method", "seed", "target_id", "kind", "entropy_nats", "kl_nats",
            "initial_kl_nats", "js_nats", "tv", "steps", "wall_s"]


# ---- the committed notebooks ---------------------------------------------------------------


def test_the_study_is_exactly_the_expected_notebooks_in_order():
    # reproduce runs notebooks in name order and names any of EXPECTED that is missing
    assert [p.stem for p in NOTEBOOKS] == list(notebooks.EXPECTED)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_is_clean(path):
    assert notebooks.notebook_problems(path) == []
    params = notebooks.default_parameters(path)
    for name in ("device", "seed", "results_dir", "progress", "run_id"):
        assert name in params, f"{path.name}: parameters cell lacks {name}"
    assert params["results_dir"] == "results" and params["run_id"] is None
    assert set(notebooks.smoke_parameters(path)) <= set(params)


def _write_nb(path: Path, cells, smoke=None):
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["dplib"] = {"smoke": smoke or {"x": 1}}
    nbformat.write(nb, path)
    return path


def _params_cell(src):
    cell = new_code_cell(src)
    cell.metadata["tags"] = ["parameters"]
    return cell


def test_notebook_problems_finds_every_breach(tmp_path):
    bad = _write_nb(tmp_path / "bad.ipynb", [
        new_code_cell("print(1)"),
        _params_cell("x = 1\ny = x + 1  # derived\nresults_dir = 'r'  # root"),
        new_code_cell("def f():\n    return 1\nclass A: pass\ng = lambda: 2"),
    ])
    nb = nbformat.read(bad, as_version=4)
    nb.cells[0].outputs = [nbformat.v4.new_output("stream", text="1")]
    nb.cells[0].execution_count = 3
    nbformat.write(nb, bad)
    problems = "\n".join(notebooks.notebook_problems(bad))
    for expected in ("markdown header", "has outputs", "execution_count 3", "x has no trailing comment",
                     "y is not a literal", "FunctionDef", "ClassDef", "Lambda", "lacks `progress`"):
        assert expected in problems, expected


def test_notebook_problems_wants_cell_ids_and_a_parseable_runtime(tmp_path):
    path = _write_nb(tmp_path / "old.ipynb", [new_markdown_cell("# T\nIt takes a while."),
                                              _params_cell("x = 1  # x")])
    nb = nbformat.read(path, as_version=4)
    nb.nbformat_minor = 4
    for cell in nb.cells:
        del cell["id"]
    nbformat.write(nb, path, version=nbformat.NO_CONVERT)
    problems = "\n".join(notebooks.notebook_problems(path))
    assert "expected 4.5" in problems and "unique id" in problems and "**Runtime** at default" in problems


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_states_a_runtime_that_reproduce_checks(path):
    stated = notebooks.stated_runtime_s(path)
    assert stated is not None and stated > 0
    assert notebooks.runtime_check(path, stated) is None
    assert notebooks.runtime_check(path, stated * 1.9) is None
    assert "update the header" in notebooks.runtime_check(path, stated * 2.5)
    assert "update the header" in notebooks.runtime_check(path, stated / 2.5)


# ---- reproduce: parameters, failure report, index ------------------------------------------


def test_run_parameters_inject_runtime_smoke_and_run_id(tmp_path):
    path = NOTEBOOKS[0]
    effective, inject = notebooks.run_parameters(path, results_dir=tmp_path, smoke=True, device="cpu")
    assert inject["results_dir"] == str(tmp_path.resolve())
    assert inject["progress"] is False and inject["device"] == "cpu"
    assert inject["run_id"] == results.run_id_for(effective)
    for key, value in notebooks.smoke_parameters(path).items():
        assert inject[key] == value
    with pytest.raises(ValueError, match="not declared"):
        notebooks.run_parameters(path, results_dir=tmp_path, overrides={"nope": 1})


def test_select_by_name_or_prefix():
    paths = [Path("00_a.ipynb"), Path("01_b.ipynb"), Path("02_c.ipynb")]
    assert notebooks.select(paths, ["01"]) == [paths[1]]
    assert notebooks.select(paths, ["00_a", "02"]) == [paths[0], paths[2]]
    assert notebooks.select(paths, None) == paths
    with pytest.raises(ValueError, match="matches none"):
        notebooks.select(paths, ["9"])


@pytest.fixture(scope="module")
def failing_reproduce(tmp_path_factory):
    """`python -m dplib reproduce` over two temporary notebooks: the first fails in its third cell."""
    root = tmp_path_factory.mktemp("repro")
    nb_dir = root / "nbs"
    nb_dir.mkdir()
    params = 'results_dir = "results"  # root\nprogress = True  # bars\nrun_id = None  # id\nx = 1  # a number'
    _write_nb(nb_dir / "a_fails.ipynb", [
        new_markdown_cell("# fails\nruntime: 1 s"), _params_cell(params),
        new_code_cell("y = x + 1"),
        new_code_cell("raise RuntimeError('deliberate failure')"),
        new_code_cell("z = 3"),
    ], smoke={"x": 2})
    _write_nb(nb_dir / "b_works.ipynb", [
        new_markdown_cell("# works\nruntime: 1 s"), _params_cell(params),
        new_code_cell("import sys\nfrom dplib import results\n"
                      "run = results.start_run('b_works', {'x': x}, results_dir=results_dir, run_id=run_id)\n"
                      "run.save_table(__import__('pandas').DataFrame({'x': [x], 'exe': [sys.executable]}), 'out', headline=True)\n"
                      "run.finish('success')"),
    ], smoke={"x": 2})
    out = subprocess.run([sys.executable, "-m", "dplib", "reproduce", "--smoke", "--notebooks", str(nb_dir),
                          "--results", str(root / "results")], capture_output=True, text=True, timeout=300)
    return root, out


def test_reproduce_reports_failing_notebook_and_cell_and_continues(failing_reproduce):
    root, out = failing_reproduce
    assert out.returncode == 1, out.stderr
    text = out.stdout + out.stderr
    assert "a_fails: FAILED at cell" in text and "deliberate failure" in text
    assert "b_works: success" in text
    (failed_json,) = (root / "results" / "a_fails").glob("*/run.json")
    meta = json.loads(failed_json.read_text())
    assert meta["status"] == "failed" and "RuntimeError" in meta["error"]
    source = nbformat.read(root / "nbs" / "a_fails.ipynb", as_version=4)
    assert meta["failed_cell"] == 3 and "deliberate failure" in source.cells[3].source
    assert "at cell 3 " in text
    executed = nbformat.read(failed_json.parent / "a_fails.ipynb", as_version=4)
    assert any("deliberate failure" in c.source for c in executed.cells)
    assert (failed_json.parent / "a_fails.html").exists()


def test_reproduce_runs_on_this_interpreter_and_writes_the_index(failing_reproduce):
    root, _ = failing_reproduce
    (run_json,) = (root / "results" / "b_works").glob("*/run.json")
    meta = json.loads(run_json.read_text())
    assert meta["status"] == "success" and meta["parameters"] == {"x": 2}  # the smoke value arrived
    assert meta["run_id"] == run_json.parent.name
    table = pd.read_csv(run_json.parent / "tables" / "out.csv")
    assert Path(table["exe"][0]).resolve() == Path(sys.executable).resolve()  # the venv's kernel
    assert (run_json.parent / "b_works.html").exists() and (run_json.parent / "b_works.ipynb").exists()
    index = (root / "results" / "index.html").read_text()
    assert "a_fails" in index and "b_works" in index and "failed" in index
    assert "b_works.html" in index and "out.csv" in index


def test_reproduce_rejects_unknown_only(tmp_path):
    from dplib.__main__ import main

    assert main(["reproduce", "--only", "zz_nothing", "--results", str(tmp_path)]) == 2


# ---- every notebook under papermill with smoke parameters (slow) --------------------------


@pytest.fixture(scope="session")
def smoke_runs(tmp_path_factory):
    """All notebooks, executed once with `reproduce --smoke` into a temporary results directory."""
    root = tmp_path_factory.mktemp("smoke")
    outcomes = notebooks.reproduce(root, smoke=True, device="cpu")
    return root, {o.name: o for o in outcomes}


CORE = ["run_id", "method", "target_id", "kl_nats"]  # what every per-target table carries


def _check_sweep_table(df: pd.DataFrame, run_id: str, required=CORE):
    missing = [c for c in required if c not in df]
    assert not missing, missing
    assert not df[required].isna().any().any(), df[required].isna().sum()
    assert (df["run_id"] == run_id).all()
    assert (df["kl_nats"] >= -1e-4).all()


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_with_smoke_parameters(smoke_runs, path):
    root, outcomes = smoke_runs
    outcome = outcomes[path.stem]
    assert outcome.status == "success", outcome.describe()
    run = results.open_run(outcome.run_dir)
    meta = run.meta
    assert meta["status"] == "success" and meta["end"]
    assert outcome.executed.exists() and outcome.html.exists()
    assert run.tables(), "the notebook wrote no table"
    assert run.figures(), "the notebook saved no figure"
    for name in run.tables():
        df = run.load_table(name)
        assert len(df) > 0, name
        if {"kl_nats", "method", "target_id", "run_id"} <= set(df.columns):
            _check_sweep_table(df, run.run_id)
    assert path.stem in (root / "index.html").read_text()


@pytest.mark.slow
def test_quickstart_smoke_tables(smoke_runs):
    _, outcomes = smoke_runs
    run = results.open_run(outcomes["00_quickstart"].run_dir)
    table = run.load_table("results")
    _check_sweep_table(table, run.run_id, REQUIRED)
    assert table["method"].tolist() == ["soft", "hard", "free_bound"]
    assert table.set_index("method")["prompt_text"][["soft", "hard"]].notna().all()
    top = run.load_table("top_tokens")
    smoke = notebooks.smoke_parameters(notebooks.notebooks_dir() / "00_quickstart.ipynb")
    assert len(top) == smoke["top_n"] * 4  # target + three methods per token
    assert (run.figures()[0].name) == "distributions.png"


@pytest.mark.slow
def test_entropy_sweep_smoke_tables(smoke_runs):
    _, outcomes = smoke_runs
    smoke = notebooks.smoke_parameters(notebooks.notebooks_dir() / "01_entropy_sweep.ipynb")
    run = results.open_run(outcomes["01_entropy_sweep"].run_dir)
    table = run.load_table("results")
    _check_sweep_table(table, run.run_id, REQUIRED)
    n_main = smoke["n_entropies"] * smoke["targets_per_entropy"]
    n_hard = smoke["n_entropies"] * smoke["hard_per_entropy"]
    n_other = smoke["other_n_entropies"] * smoke["other_targets_per_entropy"]
    counts = table.groupby(["sweep", "method"]).size().to_dict()
    assert counts == {("main", "soft"): n_main, ("main", "free_bound"): n_main, ("hard", "hard"): n_hard,
                      ("other", "soft"): n_other, ("other", "free_bound"): n_other}
    assert table.loc[table["method"] != "free_bound", "prompt_text"].notna().all()
    assert table["entropy_nats"].min() == pytest.approx(0.0, abs=1e-6)
    by_bin = run.load_table("kl_by_bin")
    assert {"model", "method", "bin_left", "bin_right", "n", "mean", "sem", "ci_low", "ci_high"} <= set(by_bin)
    assert by_bin.groupby("method")["n"].sum().to_dict() == {"soft": n_main + n_other,
                                                             "free_bound": n_main + n_other, "hard": n_hard}
    assert run.meta["headline_table"] == "tables/kl_by_bin.csv"
    assert set(run.meta["sweeps"]) == {"main", "hard", "other"}
    assert {f.name for f in run.figures()} >= {"kl_by_bin.png"}


# ---- the quickstart's playground (dplib.playground) ----------------------------------------


def test_playground_builds_without_running_and_runs_on_demand(tiny):
    import matplotlib

    matplotlib.use("Agg")
    from dplib.playground import playground

    model, tok = tiny
    pg = playground(model, tok, entropy_nats=2.0, method="free_bound", prompt_length=2, steps=3)
    assert pg.last is None  # building ran nothing
    assert pg.entropy.max == pytest.approx(5.95, abs=0.01)  # ln 384
    target, result, top = pg.run()
    assert "free_bound: KL" in pg.status.value and result.method == "free_bound"
    assert float(target.entropy[0]) == pytest.approx(2.0, abs=1e-4)
    assert set(top["source"]) == {"target", "free_bound"}
    pg.method.value, pg.k.value, pg.mass.value = "soft", 3, 0.7  # feasible at 2 nats on V = 384: m ∈ [0.634, 0.887]
    target, result, _ = pg.run()
    assert target.meta["kind"][0] == "outlier" and result.method == "soft"
    assert result.prompt_embeds.shape[1] == 2 and int(result.steps[0]) <= 4
    pg.mass.value = 1.0  # k = 3 outliers holding all the mass need entropy ln 3: infeasible at 2 nats
    pg.run()
    assert "TargetError" in pg.status.value and not pg.button.disabled


# ---- the experiment notebooks 02–05 (issue 7): their tables under smoke parameters (slow) ----


def _smoke(name):
    return notebooks.smoke_parameters(notebooks.notebooks_dir() / f"{name}.ipynb")


def _no_nan(df: pd.DataFrame, columns):
    assert not df[list(columns)].isna().any().any(), df[list(columns)].isna().sum()


def _interior_grid(vocab, n):
    import math

    return [math.log(vocab) * (i + 1) / (n + 1) for i in range(n)]


def _n_outlier_points(vocab, grid, k, m):
    from dplib import designs

    return len(designs.feasible_entropies(vocab, grid, k, m))


@pytest.mark.slow
def test_outlier_study_smoke_tables(smoke_runs):
    _, outcomes = smoke_runs
    smoke, vocab = _smoke("02_outlier_study"), 49152  # smollm2-135m's logits width
    run = results.open_run(outcomes["02_outlier_study"].run_dir)
    table = run.load_table("results")
    grid = _interior_grid(vocab, smoke["n_entropies"])
    per = smoke["targets_per_entropy"]
    expected = {"vanilla": len(grid) * per}
    for k, m in smoke["outlier_settings"]:
        expected[f"outlier k={k} m={m:g}"] = _n_outlier_points(vocab, grid, k, m) * per
    for method in ("soft", "free_bound"):
        assert table[table["method"] == method].groupby("group").size().to_dict() == expected
    diff = run.load_table("difference_by_bin")
    assert {"method", "group", "bin_left", "bin_right", "n_strata", "n", "mean", "mean_baseline", "diff",
            "sem", "ci_low", "ci_high"} <= set(diff.columns)
    _no_nan(diff, ["diff", "mean", "mean_baseline", "ci_low", "ci_high"])
    assert set(diff["group"]) == set(expected) - {"vanilla"} and set(diff["method"]) == {"soft", "free_bound"}
    assert (diff["diff"] - (diff["mean_baseline"] - diff["mean"])).abs().max() < 1e-9
    overall = run.load_table("difference_overall")
    assert len(overall) == 2 * len(smoke["outlier_settings"])
    assert overall.groupby("group")["n"].first().to_dict() == {g: n for g, n in expected.items() if g != "vanilla"}
    assert run.meta["headline_table"] == "tables/difference_by_bin.csv"


@pytest.mark.slow
def test_lm_targets_smoke_tables(smoke_runs):
    _, outcomes = smoke_runs
    smoke = _smoke("03_lm_targets")
    run = results.open_run(outcomes["03_lm_targets"].run_dir)
    table = run.load_table("results")
    counts = table.groupby(["model", "method", "source"]).size().to_dict()
    n_own, n_mapped, n_rev = smoke["n_own"], smoke["n_mapped"], smoke["n_reverse"]
    assert counts == {
        ("smollm2-135m", "soft", "own"): n_own, ("smollm2-135m", "soft", "mapped"): n_mapped,
        ("smollm2-135m", "soft", "random"): n_own + n_mapped,
        ("smollm2-135m", "free_bound", "own"): n_own, ("smollm2-135m", "free_bound", "mapped"): n_mapped,
        ("smollm2-135m", "free_bound", "random"): n_own + n_mapped,
        ("gemma3-270m", "soft", "mapped"): n_rev, ("gemma3-270m", "soft", "random"): n_rev}
    # every random control sits at its LM target's entropy
    soft = table[table["method"] == "soft"]
    paired = soft[soft["source"] != "random"].merge(soft[soft["source"] == "random"], on=["model", "pair_id"])
    assert len(paired) == n_own + n_mapped + n_rev
    assert (paired["entropy_nats_x"] - paired["entropy_nats_y"]).abs().max() < 1e-4
    mapped = table[table["source"] == "mapped"]
    assert mapped["mass_lost"].between(0, 1).all()
    reduction = run.load_table("reduction")
    assert len(reduction) == 5  # (smollm2 soft, bound) × (own, mapped) + gemma3 soft × mapped
    _no_nan(reduction, ["n", "mean_treatment", "mean_control", "gap", "relative_reduction", "rr_ci_low",
                        "rr_ci_high"])
    assert set(run.load_table("mass_lost")["source_model"]) == {"smollm2-135m", "gemma3-270m"}
    assert run.meta["headline_table"] == "tables/reduction.csv"


@pytest.mark.slow
def test_soft_vs_hard_smoke_tables(smoke_runs):
    _, outcomes = smoke_runs
    smoke = _smoke("04_soft_vs_hard")
    run = results.open_run(outcomes["04_soft_vs_hard"].run_dir)
    table = run.load_table("results")
    n = smoke["n_entropies"] * smoke["targets_per_entropy"]
    n_hard = smoke["n_entropies"] * smoke["hard_per_entropy"]
    counts = table.groupby(["method"]).size().to_dict()
    assert counts == {"soft": n * len(smoke["prompt_lengths"]), "soft_projected": n * len(smoke["prompt_lengths"]),
                      "free_bound": n, "hard": n_hard * len(smoke["hard_prompt_lengths"])}
    assert table.loc[table["method"] == "hard", "prompt_text"].notna().all()
    gaps = run.load_table("gaps")
    expected = {("hard", L) for L in smoke["hard_prompt_lengths"]} | {("soft_projected", L) for L in smoke["prompt_lengths"]}
    assert set(zip(gaps["method"], gaps["cfg_prompt_length"], strict=True)) == expected
    _no_nan(gaps, ["n", "mean_treatment", "mean_control", "gap", "gap_ci_low", "gap_ci_high"])
    assert (gaps.loc[gaps["method"] == "hard", "n"] == n_hard).all()
    summary = run.load_table("kl_by_method_L")
    assert summary["n"].sum() == len(table)
    assert run.meta["headline_table"] == "tables/gaps.csv"


@pytest.mark.slow
def test_bottleneck_smoke_tables(smoke_runs):
    from dplib import analysis

    _, outcomes = smoke_runs
    smoke, vocab = _smoke("05_bottleneck"), 49152
    run = results.open_run(outcomes["05_bottleneck"].run_dir)
    table = run.load_table("results")
    grid = _interior_grid(vocab, smoke["n_entropies"])
    n = (len(grid) * smoke["vanilla_per_entropy"] + smoke["n_lm"]
         + _n_outlier_points(vocab, grid, 3, 0.5) * smoke["outliers_per_entropy"])
    assert table.groupby("method").size().to_dict() == {m: n for m in analysis.HIERARCHY}
    wide = run.load_table("hierarchy")
    assert len(wide) == n and (wide["n_levels"] == 5).all()
    _no_nan(wide, [*analysis.HIERARCHY, *(f"part_{m}" for m in analysis.HIERARCHY)])
    parts_sum = wide[[f"part_{m}" for m in analysis.HIERARCHY]].sum(axis=1)
    assert (parts_sum - wide["hard"]).abs().max() < 1e-6
    violations = run.load_table("violations")
    assert violations["n"].tolist() == [n] * 4
    share = run.load_table("bound_share")
    assert share["n"].sum() == n
    _no_nan(share, ["ratio", "mean_numerator", "mean_denominator"])
    assert set(run.load_table("bound_share_by_kind")["kind"]) == {"vanilla", "outlier", "lm"}
    assert set(run.load_table("parts_by_bin")["kind"]) == {"all", "vanilla", "outlier", "lm"}
    assert run.meta["headline_table"] == "tables/bound_share.csv"


@pytest.mark.slow
def test_distribution_proposers_smoke_tables(smoke_runs):
    _, outcomes = smoke_runs
    smoke = _smoke("06_distribution_proposers")
    run = results.open_run(outcomes["06_distribution_proposers"].run_dir)
    table = run.load_table("results")
    n_tasks = len(smoke["tasks"])
    assert table.groupby(["model", "method"]).size().to_dict() == {
        (m, method): n_tasks for m in smoke["models"] for method in ("instruction", "hard", "soft", "free_bound")}
    prompts = table[table["method"] != "free_bound"]
    _no_nan(prompts, ["kl_nats", "kl_answers_nats", "mass_outside", "mass_other_forms", "prompt_text"])
    assert prompts["mass_outside"].between(-1e-9, 1).all()
    instructions = run.load_table("instructions")
    assert len(instructions) == sum(len(v) for v in smoke["instructions"].values()) * len(smoke["models"])
    dist = run.load_table("distributions")
    sums = dist.groupby(["model", "target_id", "source"])["prob"].sum()
    assert (sums - 1).abs().max() < 1e-6  # the answers and "(outside)" hold all the mass
    assert run.meta["headline_table"] == "tables/results.csv"
    assert {f.name for f in run.figures()} == {f"distributions_{m}.png" for m in smoke["models"]}


# ---- issue 15: parameters from the parameters cell, computed verdicts, the shared report ------------

EXPERIMENTS = [p for p in NOTEBOOKS if p.stem != "00_quickstart"]  # every notebook that states claims


def _code(path: Path) -> str:
    nb = nbformat.read(path, as_version=4)
    return "\n".join(c.source for c in nb.cells if c.cell_type == "code")


def test_cell_parameters_reads_every_name_of_the_parameters_cell(tmp_path):
    path = _write_nb(tmp_path / "p.ipynb", [new_markdown_cell("# p"),
                                            _params_cell("a = 1  # a\nb = 'x'  # b\nresults_dir = 'r'  # r")])
    namespace = {"a": 5, "b": "y", "results_dir": "elsewhere", "unrelated": 3}
    assert notebooks.cell_parameters(path, namespace) == {"a": 5, "b": "y", "results_dir": "elsewhere"}
    with pytest.raises(KeyError, match=r"\['b'\]"):
        notebooks.cell_parameters(path, {"a": 1, "results_dir": "r"})
    with pytest.raises(FileNotFoundError, match="no notebook"):
        notebooks.cell_parameters("zz_no_such_notebook", namespace)


def test_start_run_takes_identity_and_place_from_the_cell(tmp_path):
    path = _write_nb(tmp_path / "p.ipynb", [new_markdown_cell("# p"), _params_cell(
        "x = 1  # x\nresults_dir = 'r'  # r\nrun_id = None  # id\nprogress = True  # bars")])
    run = notebooks.start_run(str(path), {"x": 2, "results_dir": str(tmp_path / "res"), "run_id": None, "progress": False})
    assert run.path.parent == tmp_path / "res" / "p" and run.meta["parameters"]["x"] == 2
    assert run.run_id == results.run_id_for({"x": 2})  # results_dir, run_id and progress are not identity


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_run_identity_comes_from_the_parameters_cell(path, tmp_path):
    code = _code(path)
    assert "params = dict(" not in code and f'notebooks.start_run("{path.stem}", globals())' in code
    effective, inject = notebooks.run_parameters(path, results_dir=tmp_path, smoke=True)
    # the notebook's own id (when run by hand) is the one reproduce gives it
    assert results.run_id_for(notebooks.cell_parameters(path, effective)) == inject["run_id"]


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_experiment_notebooks_end_with_computed_verdicts(path):
    nb = nbformat.read(path, as_version=4)
    assert not any(c.cell_type == "markdown" and c.source.lstrip().startswith("## Findings") for c in nb.cells)
    last = nb.cells[-1]
    assert last.cell_type == "code" and 'run.save_table(verdicts, "verdicts")' in last.source
    assert "findings.show(verdicts)" in last.source and 'run.finish("success")' in last.source
    code = _code(path)
    assert "option_context" not in code and "% targets_per_entropy" not in code and "feasible_masses" not in code
    assert "pair_id=" not in code  # the matched controls come from designs.with_matched_controls


def _fake_report(root: Path) -> dict:
    """Two notebooks' runs (one with verdicts, a main figure and an HTML render; one without verdicts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dplib import findings

    rows = []
    for L in (1, 5):
        for i in range(6):
            rows += [{"cfg_prompt_length": L, "method": "soft", "target_id": f"t{i}", "kl_nats": 1.0 + 0.1 * i},
                     {"cfg_prompt_length": L, "method": "hard", "target_id": f"t{i}", "kl_nats": 2.0 + 0.1 * i * L}]
    verdicts = findings.hard_vs_soft(pd.DataFrame(rows))
    made = {}
    for name, with_verdicts in (("04_soft_vs_hard", True), ("00_quickstart", False)):
        run = results.start_run(name, {"seed": 0, "label": "<b>&"}, results_dir=root)
        fig, ax = plt.subplots(figsize=(3, 2))
        ax.plot([0, 1], [1, 0])
        ax.set_title(f"{name}: KL by method <L>")
        run.save_figure(fig, "main", main=True)
        run.save_figure(fig, "second", alt="a second figure")
        plt.close(fig)
        if with_verdicts:
            run.save_table(verdicts, "verdicts")
        (run.path / f"{name}.html").write_text("<html><body>executed</body></html>")
        run.finish("success", html=f"{name}.html")
        made[name] = verdicts if with_verdicts else None
    return made


def _render_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("render_index", notebooks.repo_root() / "scripts" / "render_index.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_index_shows_verdicts_figure_parameters_and_links(tmp_path):
    import html

    made = _fake_report(tmp_path)
    page = notebooks.write_index(tmp_path).read_text()
    verdicts = made["04_soft_vs_hard"]
    for row in verdicts[verdicts["headline"]].to_dict("records"):
        assert html.escape(row["claim"], quote=True) in page and html.escape(row["scope"], quote=True) in page
        assert f"{row['value']:.3g}" in page and f"[{row['ci_low']:.3g}, {row['ci_high']:.3g}]" in page
    assert "<td class='holds'" in page and "verdicts.csv" in page
    assert "alt='04_soft_vs_hard: KL by method &lt;L&gt;'" in page  # the figure's title, escaped
    assert "04_soft_vs_hard.html" in page and "executed notebook (HTML)" in page
    assert "<code>label</code>" in page and "&lt;b&gt;&amp;" in page  # parameters, escaped
    assert "No verdicts" in page  # the quickstart states no claim
    assert _render_module().static_problems(tmp_path / "index.html") == []


def test_render_index_static_check_finds_what_would_break_offline(tmp_path):
    page = tmp_path / "index.html"
    page.write_text("<html><body><img src='missing.png' alt=''><script src='https://cdn.example/x.js'></script>"
                    "<a href='#top'>top</a></body></html>")
    problems = "\n".join(_render_module().static_problems(page))
    assert "missing file" in problems and "no alt text" in problems and "needs the network" in problems
    assert "#top" not in problems


@pytest.mark.slow
def test_index_renders_in_headless_chromium(tmp_path):
    render = _render_module()
    chromium = render.find_chromium()
    if chromium is None:
        pytest.skip("no Chromium on PATH (Debian: apt-get install chromium)")
    _fake_report(tmp_path)
    notebooks.write_index(tmp_path)
    out = tmp_path / "shot.png"
    assert render.check(tmp_path / "index.html", out, chromium) == []
    assert out.stat().st_size > 10_000


@pytest.mark.slow
@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_notebook_smoke_run_writes_its_verdicts_and_the_index_lists_them(smoke_runs, path):
    import html

    from dplib import findings

    root, outcomes = smoke_runs
    run = results.open_run(outcomes[path.stem].run_dir)
    verdicts = run.load_table("verdicts")
    assert list(verdicts.columns) == findings.COLUMNS
    assert len(verdicts) > 0 and verdicts["headline"].any()
    assert set(verdicts["verdict"]) <= set(findings.VERDICTS)
    _no_nan(verdicts, ["claim", "scope", "statistic", "value", "n", "null", "verdict"])
    page = (root / "index.html").read_text()
    for row in verdicts[verdicts["headline"]].to_dict("records"):
        assert html.escape(row["claim"], quote=True) in page and html.escape(row["scope"], quote=True) in page
    assert run.main_figure() is not None

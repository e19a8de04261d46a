"""The playground's state machine (dplib.playground), driven without a browser on the tiny model:
controls, a run, its progress, Stop from another thread, errors, the history and the figure."""

from __future__ import annotations

import time

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402

from dplib import plotting  # noqa: E402
from dplib.playground import playground  # noqa: E402


@pytest.fixture
def pg(tiny):
    model, tok = tiny
    return playground(model, tok, entropy_nats=2.0, method="soft", prompt_length=2, steps=3)


def _wait_for(condition, timeout=60.0):
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_controls_a_method_ignores_are_disabled(pg):
    assert pg.state == "idle" and pg.last is None and not pg.history  # building ran nothing
    assert pg.mass.disabled and not pg.steps.disabled and not pg.prompt_length.disabled  # k = 0: m unused
    pg.k.value = 3
    assert not pg.mass.disabled
    pg.method.value = "free_bound"
    assert pg.steps.disabled and pg.prompt_length.disabled and "no step loop" in pg.estimate.value
    pg.method.value = "hard"
    assert not pg.steps.disabled and "after the first step" in pg.estimate.value
    assert pg.stop_button.disabled and not pg.button.disabled


def test_a_run_draws_the_method_beside_the_bound_and_adds_a_history_row(pg, monkeypatch):
    drawn = []
    original = plotting.distributions
    monkeypatch.setattr(plotting, "distributions", lambda top, **kw: drawn.append(kw) or original(top, **kw))
    target, result, top = pg.run()
    assert pg.state == "done" and result.method == "soft" and int(result.steps[0]) == 3  # Adam steps
    assert set(top["source"]) == {"target", "soft", "free_bound"}
    assert "soft: KL" in pg.status.value and "free-h bound" in pg.status.value
    assert pg.figure.value[:4] == b"\x89PNG" and pg.figure.layout.display == ""
    assert drawn[-1]["log_y"] is True and "soft" in set(drawn[-1]["table"]["method"])
    assert "nearest real token" in pg.note.value  # the projection explained where it is shown
    row = pg.history[0]
    assert row["method"] == "soft" and row["status"] == "done" and row["target"] == "vanilla, H = 2.00"
    assert row["kl_nats"] == pytest.approx(float(result.kl[0]))
    assert row["bound_nats"] == pytest.approx(pg.bound_kl) and row["bound_nats"] <= row["kl_nats"] + 1e-6
    assert "nearest tokens" in row["prompt"] and "soft" in pg.history_table.value
    assert pg.progress.value == pg.progress.max == 3 and "done · step 3/3 · best KL" in pg.progress_text.value
    assert "estimated duration" in pg.estimate.value  # measured in this run: known before the next one
    # the log toggle redraws the same run, no recompute
    pg.log_scale.value = False
    assert drawn[-1]["log_y"] is False and len(pg.history) == 1
    # a second run (a bound): newest first, the bound reused for the same target
    bounds = dict(pg._bounds)
    pg.method.value = "free_bound"
    _, bound, top = pg.run()
    assert set(top["source"]) == {"target", "free_bound"} and bound is bounds[next(iter(bounds))]
    assert [r["method"] for r in pg.history] == ["free_bound", "soft"]
    assert pg.history_frame().columns.tolist() == ["method", "target", "kl_nats", "bound_nats", "wall_s", "status",
                                                   "prompt"]


def test_stop_ends_a_background_run_keeping_the_best_prompt_so_far(pg):
    pg.steps.max = 100_000
    pg.steps.value = 100_000  # far more than the test waits for
    thread = pg.start()
    assert thread is not None and pg.state == "running"
    assert pg.figure.layout.display == "none"  # the previous figure is gone at once
    assert pg.button.disabled and not pg.stop_button.disabled and pg.entropy.disabled
    assert pg.start() is None  # one run at a time
    _wait_for(lambda: pg.step >= 3)
    assert pg.progress_text.value.startswith("step ") and "best KL" in pg.progress_text.value
    pg.stop()
    assert pg.wait(60) and pg.state == "stopped"
    target, result, _ = pg.last
    assert int(result.steps[0]) < 100_000 and result.prompt_embeds is not None
    row = pg.history[0]
    assert row["status"] == f"stopped at step {pg.step} of 100000"
    assert row["kl_nats"] == pytest.approx(float(result.kl[0])) and pg.best_kl == pytest.approx(float(result.kl[0]))
    assert "stopped" in pg.status.value and pg.figure.layout.display == "" and pg.progress.value == pg.step
    assert "left" not in pg.progress_text.value and pg.progress_text.value.startswith("stopped at step")
    assert not pg.button.disabled and pg.stop_button.disabled and not pg.entropy.disabled


def test_errors_go_to_the_status_line_and_leave_the_playground_usable(pg, monkeypatch):
    pg.k.value, pg.mass.value = 3, 1.0  # 3 outliers holding all the mass need entropy ln 3: infeasible at 2 nats
    assert pg.run() is None
    assert pg.state == "error" and "TargetError" in pg.status.value and not pg.history
    assert not pg.button.disabled and pg.figure.layout.display == "none"
    pg.k.value = 0

    def broken(*args, **kwargs):
        raise RuntimeError("optimiser exploded")

    from dplib import optim

    monkeypatch.setitem(optim.METHODS, "soft", broken)
    pg.start()
    assert pg.wait(60) and pg.state == "error" and "optimiser exploded" in pg.status.value
    assert not pg.history and not pg.button.disabled and pg.stop_button.disabled

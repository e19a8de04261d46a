"""An ipywidgets playground: pick a target (entropy, outliers), a method and a prompt length, press Run.

`playground(model, tokenizer)` returns a `Playground`; displaying it in JupyterLab shows the
controls, a progress bar with the live KL, a Stop button, the figure (the target's top tokens
against what the method reached, beside the free-h bound) and a table of the last runs. Building
it runs nothing (so a headless notebook can create it harmlessly).

The Run button calls `start()`, which runs the method in a background thread so that the kernel
stays free to receive the Stop click; `stop()` asks the optimiser (through its `callback`) to end
after the current step, keeping the best prompt so far. `run()` does the same in the calling
thread (tests, scripts). The state machine: "idle" → "running" (→ "stopping") → "done", "stopped"
or "error"; every finished run (done or stopped) is added to `history`.

Shortcuts: the free-h bound is computed once per target (cached by the target's parameters) and
before the method, so a stopped run still has it; the duration estimate is the time per step
measured so far (or in the last run of the same method and prompt length) times the steps left.
"""

from __future__ import annotations

import io
import logging
import math
import threading
import time

log = logging.getLogger(__name__)

PLAYGROUND_METHODS = ("soft", "hard", "free_bound", "norm_bound")
PROMPT_METHODS = ("soft", "hard")  # the methods with a step loop, a prompt length and a prompt
HISTORY_SIZE = 8  # runs kept in the history table, newest first
LONG_RUN_S = 20.0  # seconds: an estimated run longer than this is announced in the status line
REDRAW_S = 0.1  # seconds between progress-widget updates (each update is a message to the browser)


def _format_s(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


class Playground:
    """The widgets, the run state and the actions behind the Run and Stop buttons.

    Controls: entropy (nats), outlier count k (0 = a vanilla target), outlier mass m, method,
    prompt length L, steps, seed, log scale. Controls a method ignores are disabled (steps and L
    for the bounds, m when k = 0). Read-outs: `status` (one line), `progress` and `progress_text`
    (step, best KL so far, the bound, the estimated time left), `estimate` (before a run),
    `figure` (a PNG), `note` (what the figure shows, the soft projection explained), and
    `history_table` (the last runs: method, target, KL, bound, time, prompt).
    """

    def __init__(self, model, tokenizer, *, entropy_nats: float = 3.0, k: int = 0, mass: float = 0.5,
                 method: str = "soft", prompt_length: int = 5, steps: int = 100, seed: int = 0,
                 top_n: int = 12, log_scale: bool = True):
        import ipywidgets as w

        from .targets import logits_width

        self.model, self.tokenizer, self.top_n = model, tokenizer, top_n
        self.vocab = logits_width(model)
        style = {"description_width": "110px"}
        self.entropy = w.FloatSlider(value=entropy_nats, min=0.0, max=round(math.log(self.vocab), 2), step=0.05,
                                     description="entropy (nats)", style=style, continuous_update=False)
        self.k = w.IntSlider(value=k, min=0, max=50, description="outliers k", style=style)
        self.mass = w.FloatSlider(value=mass, min=0.0, max=1.0, step=0.01, description="outlier mass m",
                                  style=style)
        self.method = w.Dropdown(options=list(PLAYGROUND_METHODS), value=method, description="method", style=style)
        self.prompt_length = w.IntSlider(value=prompt_length, min=1, max=20, description="prompt length L",
                                         style=style)
        self.steps = w.IntSlider(value=steps, min=1, max=500, description="steps", style=style)
        self.seed = w.IntText(value=seed, description="seed", style=style)
        self.log_scale = w.Checkbox(value=log_scale, description="log-scale probabilities", indent=False)
        self.button = w.Button(description="Run", button_style="primary", icon="play")
        self.stop_button = w.Button(description="Stop", button_style="warning", icon="stop", disabled=True,
                                    tooltip="end the run after this step, keeping the best prompt so far")
        self.status = w.HTML(value="Choose a target and a method, then press Run.")
        self.estimate = w.HTML()
        self.progress = w.IntProgress(value=0, min=0, max=1, description="", bar_style="info",
                                      layout=w.Layout(visibility="hidden"))
        self.progress_text = w.HTML()
        self.figure = w.Image(format="png", layout=w.Layout(display="none", max_width="100%"))
        self.note = w.HTML()
        self.history_table = w.HTML()
        self.inputs = [self.entropy, self.k, self.mass, self.method, self.prompt_length, self.steps, self.seed]
        self.button.on_click(lambda _: self.start())
        self.stop_button.on_click(lambda _: self.stop())
        for control in (self.method, self.k, self.prompt_length, self.steps):
            control.observe(lambda _: self._sync_controls(), names="value")
        self.log_scale.observe(lambda _: self._redraw(), names="value")
        self.widget = w.VBox([
            w.HBox([w.VBox([self.entropy, self.k, self.mass, self.log_scale]),
                    w.VBox([self.method, self.prompt_length, self.steps, self.seed])]),
            w.HBox([self.button, self.stop_button, self.status]), self.estimate,
            w.HBox([self.progress, self.progress_text]), self.figure, self.note, self.history_table])

        self.state = "idle"  # idle | running | stopping | done | stopped | error
        self.last = None  # (targets, result, top) of the last finished run
        self.history: list[dict] = []  # finished runs, newest first (at most HISTORY_SIZE)
        self.step, self.best_kl, self.bound_kl = 0, math.nan, math.nan  # the live read-outs of a run
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._bounds: dict = {}  # target parameters -> free-h bound Result (the bound depends on the target only)
        self._step_s: dict = {}  # (method, L) -> seconds per step in the last run: the pre-run estimate
        self._drawn = None  # (top, table, suptitle) of the figure on screen, redrawn by the log toggle
        self._sync_controls()

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)

    # ---- what the controls say -------------------------------------------------------------

    def make_target(self):
        """The target the controls describe: vanilla when k = 0, else k outliers holding mass m."""
        from . import targets

        h = float(self.entropy.value)
        if self.k.value == 0:
            return targets.vanilla(self.vocab, [h], seed=int(self.seed.value))
        return targets.outliers(self.vocab, [h], k=int(self.k.value), mass=float(self.mass.value),
                                seed=int(self.seed.value))

    def _target_key(self) -> tuple:
        mass = float(self.mass.value) if self.k.value else None
        return (float(self.entropy.value), int(self.k.value), mass, int(self.seed.value))

    def config_params(self) -> dict:
        method = self.method.value
        if method in PROMPT_METHODS:
            return {"prompt_length": int(self.prompt_length.value), "steps": int(self.steps.value)}
        return {}

    def _sync_controls(self) -> None:
        """Enable the controls the chosen method reads (none while a run is on), and refresh the estimate."""
        busy = self.state in ("running", "stopping")
        for control in self.inputs:
            control.disabled = busy
        if not busy:
            self.prompt_length.disabled = self.steps.disabled = self.method.value not in PROMPT_METHODS
            self.mass.disabled = self.k.value == 0
        self.button.disabled = busy
        self.stop_button.disabled = self.state != "running"
        self.estimate.value = self._estimate_text()

    def _estimate_text(self) -> str:
        method = self.method.value
        if method not in PROMPT_METHODS:
            return "<i>a bound runs no step loop: it takes seconds on the embedded models.</i>"
        per_step = self._step_s.get((method, int(self.prompt_length.value)))
        if per_step is None:
            return "<i>duration: estimated after the first step (from its timing).</i>"
        return (f"<i>estimated duration ≈ {_format_s(per_step * int(self.steps.value))} "
                f"({per_step:.2f} s per step in the last {method} run at L = {int(self.prompt_length.value)}; "
                "an estimate).</i>")

    # ---- running -----------------------------------------------------------------------------

    def start(self) -> threading.Thread | None:
        """Begin a run in a background thread (the Run button); None if a run is already on or the
        target cannot be built (the error is on the status line)."""
        job = self._begin()
        if job is None:
            return None
        self._thread = threading.Thread(target=self._work, args=job, name="dplib-playground", daemon=True)
        self._thread.start()
        return self._thread

    def run(self):
        """Run the chosen method in this thread (blocking) and redraw; returns (target, result, top),
        or the previous run's if this one failed (the error is on the status line)."""
        job = self._begin()
        if job is not None:
            self._work(*job)
        return self.last

    def stop(self) -> None:
        """Ask the running optimiser to end after its current step; the best prompt so far is kept."""
        if self.state == "running":
            self._stop.set()
            self.state = "stopping"
            self.status.value = f"stopping {self.method.value} after this step …"
            self._sync_controls()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for a background run to end; True if none is running afterwards."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.state not in ("running", "stopping")

    def _begin(self):
        """Validate and build the target, clear the figure, lock the controls; the job for `_work`."""
        if self.state in ("running", "stopping"):
            return None
        method, params, seed = self.method.value, self.config_params(), int(self.seed.value)
        self._drawn = None  # the old figure would pass for this run's: cleared at once
        self.figure.layout.display = "none"
        self.note.value = ""
        try:
            target = self.make_target()
        except Exception as exc:  # shown to the user, not raised into the widget machinery
            self._fail(exc)
            return None
        self._stop.clear()
        self.state = "running"
        self.step, self.best_kl, self.bound_kl = 0, math.nan, math.nan
        total = params.get("steps", 0)
        self.progress.max, self.progress.value = max(total, 1), 0
        self.progress.bar_style = "info"
        self.progress.layout.visibility = "visible" if method in PROMPT_METHODS else "hidden"
        self.progress_text.value = ""
        self.status.value = "computing the free-h bound of this target …"
        self._sync_controls()
        return target, method, params, seed, self._target_key()

    def _work(self, target, method, params, seed, key) -> None:
        """The run itself (in the background thread for `start`): bound, method, figure, history."""
        from . import analysis, runner
        from .optim import METHODS

        t0 = time.perf_counter()
        try:
            if key not in self._bounds:
                self._bounds[key] = runner.run_methods(self.model, self.tokenizer, target, {"free_bound": {}},
                                                       seed=seed, progress=False)["free_bound"]
            bound = self._bounds[key]
            self.bound_kl = float(bound.kl[0])
            if method == "free_bound":
                result = bound
            else:
                self.status.value = f"running {method} … (free-h bound {self.bound_kl:.4f} nats)"
                config = runner.make_config(runner.MethodSpec(method, params, method), seed)
                kwargs = {"callback": self._on_step} if method in PROMPT_METHODS else {}
                self._t_ref, self._s_ref, self._last_draw = time.perf_counter(), 0, 0.0
                result = METHODS[method](self.model, self.tokenizer, target, config, progress=False, **kwargs)
            stopped = self._stop.is_set() and self.step < params.get("steps", 0)  # a Stop after the last step is no stop
            achieved = {method: result} if method == "free_bound" else {method: result, "free_bound": bound}
            top = analysis.top_tokens(target, achieved, self.tokenizer, n=self.top_n)
            self._finish(target, method, params, result, bound, top, stopped, time.perf_counter() - t0)
        except Exception as exc:  # shown to the user, not raised into the widget machinery
            self._fail(exc)

    def _on_step(self, step: int, best_kl: float) -> bool:
        """The optimiser's callback: record the step, refresh the read-outs now and then, say whether to stop."""
        now = time.perf_counter()
        if step == 0:  # soft's initial evaluation: time the steps from here, not from the setup
            self._t_ref, self._s_ref = now, 0
        self.step, self.best_kl = step, best_kl
        total = self.progress.max
        if now - self._last_draw >= REDRAW_S or step >= total:
            self._last_draw = now
            self.progress.value = min(step, total)
            text = (f"step {step}/{total} · best KL {best_kl:.4f} nats · free-h bound {self.bound_kl:.4f} nats")
            if step > self._s_ref:
                per_step = (now - self._t_ref) / (step - self._s_ref)
                left = per_step * max(total - step, 0)
                text += f" · ≈ {_format_s(left)} left (estimate)"
                if step - self._s_ref == 1 and per_step * total > LONG_RUN_S and self.state == "running":
                    self.status.value = (f"running {self.method.value}: a long run, ≈ {_format_s(per_step * total)}"
                                         " estimated from the first step; Stop keeps the best prompt so far.")
            self.progress_text.value = text
        return self._stop.is_set()

    def _finish(self, target, method, params, result, bound, top, stopped: bool, wall_s: float) -> None:
        import pandas as pd

        from . import analysis

        kl = float(result.kl[0])
        steps_run = int(result.steps.max()) if method in PROMPT_METHODS else 0
        total = params.get("steps", 0)
        if method in PROMPT_METHODS and steps_run > 0:
            self._step_s[(method, params["prompt_length"])] = result.wall_s / steps_run
        frame = target.frame()
        table = pd.concat([frame.assign(method=name, kl_nats=float(r.kl[0]))
                           for name, r in ({method: result} | ({} if method == "free_bound" else
                                                               {"free_bound": bound})).items()],
                          ignore_index=True)
        prompt = ""
        if method == "hard":
            prompt = result.prompt_text[0] if result.prompt_text[0] is not None else str(result.prompt_ids[0].tolist())
        elif method == "soft" and result.prompt_ids is not None:
            text = result.prompt_text[0] if result.prompt_text[0] is not None else str(result.prompt_ids[0].tolist())
            prompt = f"vectors; nearest tokens {text!r} reach KL {float(result.projected_kl[0]):.4f}"
        how = f"stopped at step {self.step} of {total}" if stopped else "done"
        self.history.insert(0, {"method": method, "target": _target_label(frame.iloc[0]), "kl_nats": kl,
                                "bound_nats": self.bound_kl, "wall_s": wall_s, "status": how, "prompt": prompt})
        del self.history[HISTORY_SIZE:]
        self._show_history()
        suptitle = f"{method}, {how}: the best prompt so far" if stopped else None
        self._drawn = (top, table, suptitle)
        self._redraw()
        notes = ["Bars: the target's most likely tokens, the probability the method gives them, and the "
                 "free-h bound's (the best any final hidden state can do)."]
        if method == "soft" and result.prompt_ids is not None:
            notes.append(analysis.projection_note(result))
        self.note.value = "<br>".join(f"<small>{n}</small>" for n in notes)
        shown = f", prompt {result.prompt_text[0]!r}" if method == "hard" and result.prompt_text else ""
        self.status.value = (f"{method}: KL {kl:.4f} nats at target entropy {float(target.entropy[0]):.3f} nats "
                             f"(free-h bound {self.bound_kl:.4f}){shown} ({wall_s:.1f} s"
                             f"{'; ' + how if stopped else ''})")
        self.progress.bar_style = "success"  # a stop is no failure: the bar stays where the run ended
        self.progress.value = min(self.step, self.progress.max) if stopped else self.progress.max
        if method in PROMPT_METHODS:  # the last read-out, without a time left that no longer applies
            self.progress_text.value = (f"{how} · step {self.step}/{total} · best KL {kl:.4f} nats · "
                                        f"free-h bound {self.bound_kl:.4f} nats")
        self.last = (target, result, top)
        self.state = "stopped" if stopped else "done"
        self._sync_controls()

    def _fail(self, exc: Exception) -> None:
        log.exception("playground run failed", exc_info=exc)
        self.status.value = f"<span style='color:#b00'>{type(exc).__name__}: {exc}</span>"
        self.note.value = "<small>no figure: the run did not finish.</small>"
        self.progress.bar_style = "danger"
        self.state = "error"
        self._sync_controls()

    # ---- drawing -------------------------------------------------------------------------------

    def _redraw(self) -> None:
        """Draw the last finished run's figure (again, e.g. after the log toggle) as a PNG."""
        if self._drawn is None:
            return
        import matplotlib.pyplot as plt

        from . import plotting

        top, table, suptitle = self._drawn
        fig = plotting.distributions(top, table=table, title=suptitle, log_y=bool(self.log_scale.value))
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=90)
        plt.close(fig)  # shown once, in the image widget; never again by the inline backend
        self.figure.value = buffer.getvalue()
        self.figure.layout.display = ""

    def history_frame(self):
        """The last runs as a table, newest first: method, target, kl_nats, bound_nats, wall_s, status, prompt."""
        import pandas as pd

        return pd.DataFrame(self.history, columns=["method", "target", "kl_nats", "bound_nats", "wall_s", "status",
                                                   "prompt"])

    def _show_history(self) -> None:
        from . import plotting

        self.history_table.value = ("<b>last runs</b> (KL and free-h bound in nats, time in seconds)"
                                    + plotting.readable(self.history_frame()).to_html())


def _target_label(row) -> str:
    """'vanilla, H = 3.00' or 'outlier k = 3, m = 0.70, H = 2.00' (entropy in nats)."""
    if row.get("kind") == "outlier":
        return f"outlier k = {int(row['k'])}, m = {float(row['mass']):.2f}, H = {float(row['entropy_nats']):.2f}"
    return f"{row.get('kind', 'target')}, H = {float(row['entropy_nats']):.2f}"


def playground(model, tokenizer, **defaults) -> Playground:
    """The interactive playground for `model`; display the returned object in a notebook."""
    return Playground(model, tokenizer, **defaults)

"""An ipywidgets playground: pick a target (entropy, outliers), a method and a prompt length, press Run.

`playground(model, tokenizer)` returns a `Playground`; displaying it in JupyterLab shows the
controls and an output area where each Run draws the target's top tokens against what the
method achieved, with the KL. Building it runs nothing (so a headless notebook can create it
harmlessly); optimisation happens only in `Playground.run()`, which the Run button calls.
"""

from __future__ import annotations

import logging
import math

log = logging.getLogger(__name__)

PLAYGROUND_METHODS = ("soft", "hard", "free_bound", "norm_bound")


class Playground:
    """The widgets and the action behind the Run button.

    Controls: entropy (nats), outlier count k (0 = a vanilla target), outlier mass m, method,
    prompt length L, steps, seed. `run()` builds the target, runs the method and redraws.
    """

    def __init__(self, model, tokenizer, *, entropy_nats: float = 3.0, k: int = 0, mass: float = 0.5,
                 method: str = "soft", prompt_length: int = 5, steps: int = 100, seed: int = 0,
                 top_n: int = 12):
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
        self.button = w.Button(description="Run", button_style="primary", icon="play")
        self.status = w.HTML(value="Choose a target and a method, then press Run.")
        self.output = w.Output()
        self.button.on_click(lambda _: self.run())
        self.widget = w.VBox([
            w.HBox([w.VBox([self.entropy, self.k, self.mass]),
                    w.VBox([self.method, self.prompt_length, self.steps, self.seed])]),
            w.HBox([self.button, self.status]), self.output])
        self.last = None  # (targets, result, table) of the last run

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)

    def make_target(self):
        """The target the controls describe: vanilla when k = 0, else k outliers holding mass m."""
        from . import targets

        h = float(self.entropy.value)
        if self.k.value == 0:
            return targets.vanilla(self.vocab, [h], seed=int(self.seed.value))
        return targets.outliers(self.vocab, [h], k=int(self.k.value), mass=float(self.mass.value),
                                seed=int(self.seed.value))

    def config_params(self) -> dict:
        method = self.method.value
        if method in ("soft", "hard"):
            return {"prompt_length": int(self.prompt_length.value), "steps": int(self.steps.value)}
        return {}

    def run(self):
        """Build the target, run the chosen method, and redraw; errors go to the status line."""
        import matplotlib.pyplot as plt
        from IPython.display import display

        from . import analysis, plotting, runner

        self.button.disabled = True
        self.status.value = f"running {self.method.value} ..."
        try:
            target = self.make_target()
            found = runner.run_methods(self.model, self.tokenizer, target,
                                       {self.method.value: self.config_params()},
                                       seed=int(self.seed.value), progress=False)
            result = found[self.method.value]
            top = analysis.top_tokens(target, found, self.tokenizer, n=self.top_n)
            text = f", prompt {result.prompt_text[0]!r}" if result.prompt_text else ""
            summary = (f"{self.method.value}: KL {float(result.kl[0]):.4f} nats at target entropy "
                       f"{float(target.entropy[0]):.3f} nats{text} ({result.wall_s:.1f} s)")
            self.output.clear_output(wait=True)
            fig = plotting.distributions(top, title=summary)
            with self.output:
                display(fig)
            plt.close(fig)  # displayed once, in the output area; not again by the inline backend
            self.status.value = summary
            self.last = (target, result, top)
        except Exception as exc:  # shown to the user, not raised into the widget machinery
            log.exception("playground run failed")
            self.status.value = f"<span style='color:#b00'>{type(exc).__name__}: {exc}</span>"
        finally:
            self.button.disabled = False
        return self.last


def playground(model, tokenizer, **defaults) -> Playground:
    """The interactive playground for `model`; display the returned object in a notebook."""
    return Playground(model, tokenizer, **defaults)

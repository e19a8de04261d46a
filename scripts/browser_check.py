"""Open the quickstart in a real JupyterLab in headless Chromium, run it, and use the playground once.

What it checks, as a researcher would see it: the quickstart runs to the end in the browser (at its
smoke parameters, so it takes a few minutes on a CPU); the playground shows up; pressing Run shows a
progress line with the live KL; Stop ends the run and keeps the best prompt so far; the figure (an
image), the free-h bound and a row of the history table appear. Screenshots go to --out.

Needs, besides the repo's .venv (JupyterLab, the embedded model): Playwright for Python and a Chromium.
Playwright's own browser download is not needed: a system Chromium works (Debian: `apt-get install
chromium`), found on PATH or given with --chromium.

    pip install playwright                      # in any Python, e.g. a separate venv
    python scripts/browser_check.py --out /tmp/browser_check

Exit status 0 when every check passed; otherwise the failed check is printed with a screenshot.
The committed notebook is not touched: a copy with the smoke parameters runs in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "00_quickstart.ipynb"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def smoke_copy(folder: Path, results_dir: Path) -> Path:
    """The quickstart with a cell after `parameters` setting its smoke parameters (interactive on)."""
    nb = json.loads(NOTEBOOK.read_text())
    overrides = dict(nb["metadata"].get("dplib", {}).get("smoke", {}))
    overrides |= {"interactive": True, "progress": False, "device": "cpu", "results_dir": str(results_dir)}
    at = next(i for i, c in enumerate(nb["cells"]) if "parameters" in c.get("metadata", {}).get("tags", []))
    source = [f"{k} = {v!r}\n" for k, v in overrides.items()]
    nb["cells"].insert(at + 1, {"cell_type": "code", "metadata": {}, "execution_count": None, "outputs": [],
                                "source": source})
    path = folder / "quickstart_check.ipynb"
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    return path


def start_lab(folder: Path, port: int, token: str, log_path: Path) -> subprocess.Popen:
    jupyter = ROOT / ".venv" / "bin" / "jupyter"
    if not jupyter.exists():
        raise SystemExit(f"{jupyter} not found: run `make test` (or `make setup`) first to create the .venv.")
    log = open(log_path, "w")  # noqa: SIM115 - kept open for the server's lifetime
    proc = subprocess.Popen([str(jupyter), "lab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
                             f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={folder}",
                             "--ServerApp.disable_check_xsrf=True", *(["--allow-root"] if os.geteuid() == 0 else [])],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "MPLBACKEND": ""})
    url = f"http://127.0.0.1:{port}/api/status?token={token}"
    for _ in range(120):
        try:
            urllib.request.urlopen(url, timeout=2)
            return proc
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"jupyter lab exited early; see {log_path}") from None
            time.sleep(1)
    proc.terminate()
    raise SystemExit(f"jupyter lab did not answer on port {port} within 120 s; see {log_path}")


def check(page, out: Path, name: str, condition, timeout_s: float, what: str) -> None:
    """Poll `condition()` until true; on timeout, screenshot and exit with `what`."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            if condition():
                print(f"ok: {what}")
                page.screenshot(path=str(out / f"{name}.png"), full_page=True)
                return
        except Exception:  # the page is still changing: try again
            pass
        time.sleep(1)
    page.screenshot(path=str(out / f"{name}_FAILED.png"), full_page=True)
    raise SystemExit(f"FAILED: {what} (not seen within {timeout_s:.0f} s); screenshot {out / (name + '_FAILED.png')}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="browser_check", help="folder for screenshots and the server log")
    parser.add_argument("--chromium", default=None, help="the Chromium executable (default: chromium on PATH)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed for running the notebook")
    args = parser.parse_args(argv)
    # imported here, after --help works: nothing else in the repo needs playwright
    from playwright.sync_api import sync_playwright

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    chromium = args.chromium or shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("no Chromium found: install one (Debian: apt-get install chromium) or pass --chromium")
    folder = Path(tempfile.mkdtemp(prefix="dplib-browser-"))
    notebook = smoke_copy(folder, folder / "results")
    port, token = free_port(), secrets.token_hex(16)
    lab = start_lab(folder, port, token, out / "jupyter.log")
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/lab/tree/{notebook.name}?token={token}")
            check(page, out, "01_opened", lambda: page.locator(".jp-Notebook .jp-Cell").count() > 5, 120,
                  "the quickstart opens in JupyterLab")
            check(page, out, "02_kernel", lambda: "Idle" in page.locator("#jp-main-statusbar").inner_text(), 120,
                  "the kernel is up (idle)")
            page.get_by_role("menuitem", name="Run", exact=True).click()
            page.get_by_text("Run All Cells", exact=True).click()
            run = page.locator(".jp-OutputArea button.jupyter-button", has_text="Run")
            check(page, out, "03_playground", lambda: run.count() == 1 and run.first.is_visible(), args.timeout,
                  "the notebook ran to the playground, which shows its Run button")
            run.first.scroll_into_view_if_needed()
            run.first.click()
            progress = page.locator(".jp-OutputArea .widget-html", has_text="best KL")
            check(page, out, "04_progress", lambda: progress.count() > 0 and "step" in progress.first.inner_text(),
                  300, "a progress line with the live KL appears while the method runs")
            page.locator(".jp-OutputArea button.jupyter-button", has_text="Stop").first.click()
            status = page.locator(".jp-OutputArea .widget-html", has_text="KL")
            check(page, out, "05_stopped",
                  lambda: any("stopped" in t and "free-h bound" in t for t in status.all_inner_texts()), 300,
                  "Stop ends the run; the status gives the best KL so far and the free-h bound")
            figure = page.locator(".jp-OutputArea .widget-image")
            check(page, out, "06_figure", lambda: figure.count() > 0 and figure.first.is_visible()
                  and figure.first.bounding_box()["height"] > 100, 60, "the figure is drawn")
            history = page.locator(".jp-OutputArea .widget-html", has_text="last runs")
            check(page, out, "07_history", lambda: history.count() > 0 and "soft" in history.first.inner_text()
                  and "stopped at step" in history.first.inner_text(), 60, "the history table has the run's row")
            browser.close()
    finally:
        lab.terminate()
        try:
            lab.wait(20)
        except subprocess.TimeoutExpired:
            lab.kill()
        shutil.rmtree(folder, ignore_errors=True)
    print(f"all checks passed; screenshots in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

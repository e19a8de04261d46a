"""Render the shared report (results/index.html) in headless Chromium, offline, and check it.

What it checks, as a reader opening the file would see it:
  1. every image and link the page uses is a relative path to a file that exists (nothing on a
     server, nothing on the network: no http(s) reference at all), and every image has alt text;
  2. Chromium renders the page from file:// with networking disabled (`--headless --screenshot`),
     and the screenshot is not blank.

    python scripts/render_index.py                       # results/index.html -> results/index.png
    python scripts/render_index.py path/to/index.html --out /tmp/index.png --chromium /usr/bin/chromium

Needs a Chromium (Debian: `apt-get install chromium`), found on PATH or given with --chromium.
Exit status 0 when every check passed; otherwise each problem is printed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

ROOT = Path(__file__).resolve().parents[1]
CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def find_chromium(given: str | None = None) -> str | None:
    """The Chromium executable: `given`, else the first of CANDIDATES on PATH (None if none)."""
    if given:
        return given if Path(given).exists() or shutil.which(given) else None
    return next((shutil.which(c) for c in CANDIDATES if shutil.which(c)), None)


class _Refs(HTMLParser):
    """Collects (tag, attribute, value) of every src/href and the alt text of every <img>."""

    def __init__(self):
        super().__init__()
        self.refs: list[tuple[str, str, str]] = []
        self.images: list[dict] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for name in ("src", "href"):
            if attrs.get(name):
                self.refs.append((tag, name, attrs[name]))
        if tag == "img":
            self.images.append(attrs)


def static_problems(index: Path) -> list[str]:
    """What would break the page offline: remote or missing references, images without alt text."""
    parser = _Refs()
    parser.feed(index.read_text(encoding="utf-8"))
    problems = []
    for tag, name, value in parser.refs:
        url = urlparse(value)
        if url.scheme in ("http", "https") or value.startswith("//"):
            problems.append(f"<{tag} {name}={value!r}> needs the network")
        elif url.scheme in ("", "file") and not value.startswith("#"):
            target = (index.parent / unquote(url.path)).resolve()
            if not target.exists():
                problems.append(f"<{tag} {name}={value!r}> points to a missing file {target}")
    for img in parser.images:
        if not (img.get("alt") or "").strip():
            problems.append(f"<img src={img.get('src')!r}> has no alt text")
    return problems


def screenshot(index: Path, out: Path, chromium: str, *, width: int = 1280, height: int = 2400,
               timeout: int = 120) -> subprocess.CompletedProcess:
    """Chromium's headless screenshot of `index` (file://, no network, a throwaway profile)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        cmd = [chromium, "--headless", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
               f"--user-data-dir={profile}", f"--window-size={width},{height}", f"--screenshot={out}",
               "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",  # any network request fails
               *(["--no-sandbox"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []),
               index.resolve().as_uri()]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def blank(png: Path) -> bool:
    """True when the screenshot is missing, empty or one colour (nothing was drawn)."""
    if not png.exists() or png.stat().st_size == 0:
        return True
    import matplotlib.image as mpimg

    pixels = mpimg.imread(png)
    return pixels.ndim < 2 or float(pixels[..., :3].std()) < 1e-3


def check(index: Path, out: Path, chromium: str | None) -> list[str]:
    """Every problem found (static checks, then the render); [] when the page is fine."""
    if not index.exists():
        return [f"{index} does not exist: run `python -m dplib reproduce` (or write_index) first"]
    problems = static_problems(index)
    if chromium is None:
        return problems + [f"no Chromium found (tried {', '.join(CANDIDATES)}); pass --chromium"]
    done = screenshot(index, out, chromium)
    if done.returncode != 0:
        problems.append(f"chromium exited with {done.returncode}: {done.stderr.strip()[-2000:]}")
    if blank(out):
        problems.append(f"the screenshot {out} is missing or blank")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("index", nargs="?", default=str(ROOT / "results" / "index.html"))
    parser.add_argument("--out", default=None, help="the screenshot (default: index.png beside the page)")
    parser.add_argument("--chromium", default=None, help="the Chromium executable (default: found on PATH)")
    args = parser.parse_args(argv)
    index = Path(args.index)
    out = Path(args.out) if args.out else index.with_suffix(".png")
    problems = check(index, out, find_chromium(args.chromium))
    for p in problems:
        print(f"PROBLEM: {p}", file=sys.stderr)
    if not problems:
        print(f"ok: {index} renders offline; screenshot {out}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

"""Render a bench report (report.html) in headless Chromium and save a full-page PNG screenshot.

    python scripts/report_screenshot.py runs/bench/quick/report.html --output runs/bench/quick/report.png

Needs Debian's ``chromium`` (``apt-get install chromium``). Exits with status 2 and a message when no
Chromium is found.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "chrome")


def find_chromium() -> str | None:
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def screenshot(html: Path, output: Path, width: int = 1200, height: int = 4000, timeout: float = 120) -> Path:
    browser = find_chromium()
    if browser is None:
        raise FileNotFoundError("no Chromium found (apt-get install chromium)")
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gradtail_chromium_") as profile:
        cmd = [
            browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", f"--window-size={width},{height}", "--hide-scrollbars",
            f"--screenshot={output.resolve()}", html.resolve().as_uri(),
        ]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True, timeout=timeout)
    if not output.is_file() or output.stat().st_size == 0:
        raise RuntimeError(f"Chromium wrote no screenshot to {output}")
    return output


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("report", type=Path)
    p.add_argument("--output", type=Path)
    p.add_argument("--width", type=int, default=1200)
    p.add_argument("--height", type=int, default=4000)
    args = p.parse_args()
    try:
        out = screenshot(args.report, args.output or args.report.with_suffix(".png"), args.width, args.height)
    except FileNotFoundError as e:
        print(f"report_screenshot: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

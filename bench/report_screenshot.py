"""Open a run's report.html in headless Chromium and save a screenshot next to it.

    python bench/report_screenshot.py [-w WORKSPACE] [--run RUN_ID] [--out report.png]

Needs Chromium (Debian: apt-get install chromium). Prints the PNG path and fails if the page did not render.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-w", "--workspace", default=".")
    ap.add_argument("--run")
    ap.add_argument("--out")
    ap.add_argument("--height", type=int, default=2600)
    a = ap.parse_args()
    runs = sorted((Path(a.workspace) / "runs").glob("*/report.html"))
    if a.run:
        runs = [p for p in runs if p.parent.name == a.run]
    if not runs:
        sys.exit(f"no report.html under {a.workspace}/runs: run `opensem run` first")
    report = runs[-1].resolve()
    out = Path(a.out or report.with_suffix(".png")).resolve()
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not exe:
        sys.exit("Chromium not found: apt-get install chromium")
    with tempfile.TemporaryDirectory() as profile:
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
               f"--user-data-dir={profile}", f"--window-size=1280,{a.height}", f"--screenshot={out}", report.as_uri()]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    if not out.exists() or out.stat().st_size < 10_000:
        sys.exit(f"screenshot failed or blank: {out}")
    print(out)


if __name__ == "__main__":
    main()

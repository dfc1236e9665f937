"""Screenshot of a report page in headless Chromium (how docs/report-1400.png was made).

    python docs/screenshot.py ftpipe-demo/tracks/report/index.html docs/report-1400.png --width 1400 --height 1300

Uses the same Chromium + Selenium set-up as the report's browser test (tests/browser.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    from browser import driver, ensure_chromium

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("page", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--width", type=int, default=1400)
    ap.add_argument("--height", type=int, default=1300)
    args = ap.parse_args()
    why = ensure_chromium()
    if why:
        sys.exit(why)
    d = driver(width=args.width, height=args.height)
    try:
        d.get(args.page.resolve().as_uri())
        d.save_screenshot(str(args.out))
    finally:
        d.quit()
    print(args.out)


if __name__ == "__main__":
    main()

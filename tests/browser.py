"""A headless Chromium for tests (and docs/screenshot.py): Debian's ``chromium`` + ``chromium-driver`` driven by
Selenium. Installed with apt-get when missing and running as root; otherwise the caller skips with the reason."""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

PACKAGES = ("chromium", "chromium-driver")


def ensure_chromium() -> str | None:
    """None when chromium and chromedriver are there (installing them if possible), else why not."""
    if shutil.which("chromium") and shutil.which("chromedriver"):
        return None
    if not shutil.which("apt-get"):
        return "chromium/chromedriver missing and no apt-get to install them"
    if os.geteuid() != 0:
        return "chromium/chromedriver missing; install them with: sudo apt-get install chromium chromium-driver"
    try:
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES], check=True,
                       capture_output=True, timeout=900, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    except (subprocess.SubprocessError, OSError) as exc:
        return f"could not apt-get install {' '.join(PACKAGES)}: {exc}"
    if shutil.which("chromium") and shutil.which("chromedriver"):
        return None
    return "apt-get ran but chromium/chromedriver are still missing"


def driver(*, width: int = 1400, height: int = 1000) -> Any:
    """A headless Chromium WebDriver that records the page's console messages (``get_log('browser')``)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or "chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", "--allow-file-access-from-files"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(shutil.which("chromedriver") or "chromedriver"), options=opts)

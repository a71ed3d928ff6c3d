"""Opens an evaluation report in headless Chromium (Debian's `chromium` and `chromium-driver`, driven by selenium)
and says what a person would see: console errors, images that did not load, the cards and candidates drawn.

    python -m tests.report_browser REPORT_DIR [--screenshot=OUT.png]    # prints the JSON of `inspect`
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

_IMAGES = """
return Array.from(document.images).map(img => ({src: img.getAttribute('src'), complete: img.complete,
                                                 width: img.naturalWidth}));
"""


def available() -> str | None:
    """Why the browser cannot run here, or None when it can."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not shutil.which(path):
            return f"{path} is not installed (Debian packages chromium and chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (the dev extra)"
    return None


def inspect(report_dir: str, screenshot: str | None = None) -> dict:
    """Loads `report_dir/index.html` from file:// and returns `console_errors` (SEVERE console entries, e.g. an
    image that failed to load), `broken_images` (src of each image with no pixels), `images`, `cards` and
    `candidates`; writes a full-page screenshot when asked."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get("file://" + os.path.abspath(os.path.join(report_dir, "index.html")))
        deadline = time.monotonic() + 30
        images = driver.execute_script(_IMAGES)
        while not all(image["complete"] for image in images) and time.monotonic() < deadline:
            time.sleep(0.2)
            images = driver.execute_script(_IMAGES)
        found = {
            "console_errors": [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"],
            "broken_images": [image["src"] for image in images if not image["complete"] or image["width"] == 0],
            "images": len(images),
            "cards": len(driver.find_elements("css selector", "section.card")),
            "candidates": len(driver.find_elements("css selector", "section.card figure.candidate")),
        }
        if screenshot:
            height = driver.execute_script("return document.body.scrollHeight")
            driver.set_window_size(1400, min(int(height) + 50, 6000))
            driver.save_screenshot(screenshot)
        return found
    finally:
        driver.quit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report_dir")
    parser.add_argument("--screenshot", default=None)
    args = parser.parse_args()
    print(json.dumps(inspect(args.report_dir, args.screenshot)))


if __name__ == "__main__":
    main()

"""The Snakemake report as a reader sees it: rendered by headless Chromium (selenium), after the
HTML file was copied into an empty directory, so that nothing on the page can lean on the
project's files. ``.ci/run`` installs Chromium and its driver when they are missing; where they
cannot be found the test is skipped with the reason."""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
DRIVER = "chromedriver"
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1400,1000")


@dataclass
class LandingPage:
    text: str
    images: list[dict]  # src (first 40 characters), complete, naturalWidth
    tables: list[dict]  # scrollWidth, clientWidth, text of each <table>


def _binaries() -> tuple[str, str]:
    pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[test]')")
    browser = next((shutil.which(name) for name in CHROMIUM if shutil.which(name)), None)
    driver = shutil.which(DRIVER)
    if not browser or not driver:
        pytest.skip("no Chromium and chromedriver on this machine (.ci/run installs them: "
                    "apt-get install chromium chromium-driver)")
    return browser, driver


def open_moved_report(report: Path, empty_dir: Path, settle_s: float = 10.0) -> LandingPage:
    """Copy ``report`` into ``empty_dir``, open it in headless Chromium and read the landing page
    once its images have finished loading (or ``settle_s`` has passed)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    browser, driver_path = _binaries()
    empty_dir.mkdir(parents=True, exist_ok=True)
    assert not any(empty_dir.iterdir()), empty_dir
    moved = empty_dir / report.name
    shutil.copy(report, moved)
    options = Options()
    options.binary_location = browser
    for flag in FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(moved.resolve().as_uri())
        deadline = time.monotonic() + settle_s
        while time.monotonic() < deadline:
            ready = driver.execute_script(
                "return document.readyState === 'complete' && document.querySelector('table') !== null"
                " && Array.from(document.images).every(i => i.complete)")
            if ready:
                break
            time.sleep(0.2)
        images = driver.execute_script(
            "return Array.from(document.images).map(i => ({src: i.src.slice(0, 40), complete: i.complete,"
            " naturalWidth: i.naturalWidth}))")
        tables = driver.execute_script(
            "return Array.from(document.querySelectorAll('table')).map(t => ({scrollWidth: t.scrollWidth,"
            " clientWidth: t.parentElement.clientWidth, text: t.innerText}))")
        text = driver.execute_script("return document.body.innerText")
    finally:
        driver.quit()
    return LandingPage(text=text, images=images, tables=tables)


def assert_readable(page: LandingPage) -> None:
    """Every image of the landing page loaded, one of them the embedded plot; every table fits its
    column; docutils reported no problem."""
    assert page.images, "no image on the landing page"
    broken = [image["src"] for image in page.images if not image["complete"] or image["naturalWidth"] == 0]
    assert not broken, f"images that did not load: {broken}"
    assert any(image["src"].startswith("data:image/png") for image in page.images), page.images
    assert page.tables, "no table on the landing page"
    for table in page.tables:
        assert table["scrollWidth"] <= table["clientWidth"], (table["scrollWidth"], table["clientWidth"])
    assert "System Message" not in page.text, page.text[:2000]

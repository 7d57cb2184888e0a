"""The playground page in a real headless browser (Debian's chromium and chromium-driver), on the real engine."""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from orchestrator.settings import Settings

from .conftest import live_server, wait_for

pytestmark = pytest.mark.docker

KEY = "sk-playground"
# matplotlib's first line colour, #1f77b4.
LINE_BLUE = (31, 119, 180)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        message = "chromium and chromium-driver are needed (apt-get install chromium chromium-driver)"
        if os.environ.get("CI") or os.environ.get("ORCH_TEST_REQUIRE_DOCKER"):
            pytest.fail(message)
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
    ):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(tmp_path / "downloads")})
    # An explicit driver path: selenium never looks for (or downloads) one itself.
    chrome = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    try:
        yield chrome
    finally:
        chrome.quit()


@pytest.fixture
def url(make_settings: Callable[..., Settings]) -> Iterator[str]:
    with live_server(make_settings(execute_timeout_seconds=20)) as base:
        yield base


def run_cell(browser: WebDriver, code: str) -> None:
    box = browser.find_element(By.ID, "code")
    box.clear()
    box.send_keys(code)
    browser.find_element(By.ID, "run").click()


def newest_outcome(browser: WebDriver) -> str | None:
    cells = browser.find_elements(By.CSS_SELECTOR, "#cells .cell")
    return cells[0].find_element(By.CSS_SELECTOR, ".status").get_attribute("data-outcome") if cells else None


def blue_pixels(png: bytes, box: dict[str, float], scale: float) -> int:
    image = Image.open(io.BytesIO(png)).convert("RGB")
    left, top = box["x"] * scale, box["y"] * scale
    crop = image.crop((int(left), int(top), int(left + box["width"] * scale), int(top + box["height"] * scale)))
    raw = crop.tobytes()
    pixels = (raw[i : i + 3] for i in range(0, len(raw), 3))
    return sum(1 for pixel in pixels if all(abs(a - b) < 40 for a, b in zip(pixel, LINE_BLUE, strict=True)))


def test_playground_runs_cells_streams_shows_images_and_manages_files(
    browser: WebDriver, url: str, tmp_path: Path
) -> None:
    browser.get(f"{url}/playground")
    browser.find_element(By.ID, "key").send_keys(KEY)
    browser.find_element(By.ID, "save-key").click()

    # Streamed output shows while the cell still runs; interrupt stops it and keeps the state.
    run_cell(browser, "x = 3\nprint('first', flush=True)\nimport time\nwhile True:\n    time.sleep(0.05)")
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#cells .cell .out pre.stdout"), 60, "streamed output")
    assert browser.find_element(By.CSS_SELECTOR, "#cells .cell .out pre.stdout").text == "first"
    assert newest_outcome(browser) is None  # still running
    assert browser.find_element(By.ID, "run-state").text == "running"
    browser.find_element(By.ID, "interrupt").click()
    wait_for(lambda: newest_outcome(browser) == "interrupted", 30, "the cell to be interrupted")
    session_id = browser.find_element(By.ID, "session-label").text
    assert session_id.startswith("ses_")

    # An image inline, in the same session (x is still there).
    run_cell(
        browser, "import matplotlib.pyplot as plt\nplt.plot([0, 1, 2], [0, 4, 1], linewidth=8)\nplt.show()\nprint(x)"
    )
    wait_for(lambda: newest_outcome(browser) == "ok", 60, "the plot cell")
    cell = browser.find_elements(By.CSS_SELECTOR, "#cells .cell")[0]
    image = cell.find_element(By.CSS_SELECTOR, ".out img")
    assert cell.find_element(By.CSS_SELECTOR, ".out pre.stdout").text == "3"
    browser.execute_script("arguments[0].scrollIntoView();", image)
    wait_for(
        lambda: browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image),
        10,
        "the image",
    )
    box = browser.execute_script("return arguments[0].getBoundingClientRect().toJSON();", image)
    scale = browser.execute_script("return window.devicePixelRatio;")
    assert blue_pixels(browser.get_screenshot_as_png(), box, scale) > 500, "the plot's line is not on screen"

    # Errors are formatted as errors.
    run_cell(browser, "1/0")
    wait_for(lambda: newest_outcome(browser) == "error", 30, "the failing cell")
    error = browser.find_elements(By.CSS_SELECTOR, "#cells .cell")[0].find_element(By.CSS_SELECTOR, "pre.error")
    assert "ZeroDivisionError" in error.text

    # The session list, with its expiry.
    row = wait_for(
        lambda: browser.find_elements(By.CSS_SELECTOR, f"#sessions tr[data-session='{session_id}']"), 10, "row"
    )
    assert row[0].find_elements(By.TAG_NAME, "td")[2].text.endswith("min")

    # Upload, then download through the page (a "#" in the name once fetched the file before it).
    source = tmp_path / "hello#2.bin"
    source.write_bytes(bytes(range(256)))
    browser.find_element(By.ID, "upload").send_keys(str(source))
    browser.find_element(By.ID, "upload-button").click()
    listed = wait_for(
        lambda: browser.find_elements(By.CSS_SELECTOR, "#files tr[data-path='hello#2.bin']"), 30, "upload"
    )
    listed[0].find_element(By.CSS_SELECTOR, "button.download").click()
    saved = tmp_path / "downloads" / "hello#2.bin"
    wait_for(saved.exists, 30, "the download")
    assert saved.read_bytes() == bytes(range(256))

    # Close the session from the list.
    row = browser.find_element(By.CSS_SELECTOR, f"#sessions tr[data-session='{session_id}']")
    row.find_element(By.CSS_SELECTOR, "button.close-session").click()
    wait_for(
        lambda: not browser.find_elements(By.CSS_SELECTOR, f"#sessions tr[data-session='{session_id}']"), 30, "close"
    )
    assert browser.find_element(By.ID, "session-label").text == "new session"


def test_playground_is_self_contained(url: str) -> None:
    import httpx

    page = httpx.get(f"{url}/playground")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    # Works offline: nothing loaded from another origin.
    assert "http://" not in page.text
    assert "https://" not in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]

"""The web page in a real browser: Playwright drives Debian's chromium (``apt-get install -y
chromium``; Playwright's own browser download cannot work here). Without chromium these
tests FAIL: the page is part of the product. Screenshots go to ``$RSVL_TEST_ARTIFACTS``
(default: a folder under pytest's temporary directory)."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import uvicorn
from serve_util import shared_loader

from rsvl.serve.app import create_app

CHROMIUM = os.environ.get("RSVL_CHROMIUM", "/usr/bin/chromium")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = Path(os.environ.get("RSVL_TEST_ARTIFACTS") or tmp_path_factory.mktemp("artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def server(roots: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    app = create_app([roots["root"]], state_dir=tmp_path_factory.mktemp("serve-page"), model_loader=shared_loader)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    end = time.monotonic() + 30
    while not srv.started and time.monotonic() < end:
        time.sleep(0.05)
    assert srv.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser():
    path = shutil.which(CHROMIUM) or (CHROMIUM if os.path.exists(CHROMIUM) else None)
    if path is None:
        pytest.fail(f"chromium not found at {CHROMIUM}: install it with `apt-get install -y chromium` "
                    "(or point RSVL_CHROMIUM at a Chromium binary).")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def test_segment_on_the_sample_and_chat(server: str, browser, artifacts: Path) -> None:
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    external: list[str] = []
    page.on("request", lambda r: external.append(r.url) if not r.url.startswith(server) else None)
    page.goto(server + "/")
    page.wait_for_selector("#file-list li[data-path='OSBS_029.tif']", timeout=30_000)
    page.click("#file-list li[data-path='OSBS_029.tif']")
    page.wait_for_selector(".leaflet-tile-loaded", timeout=30_000)
    assert "400 x 400" in page.inner_text("#current")

    page.select_option("#task", "segment")
    page.select_option("#model", "mini-clip")
    page.fill("#prompt", "trees, grass, road")
    page.click("#run")
    page.wait_for_selector("#legend li", timeout=120_000)
    legend = [t.strip() for t in page.locator("#legend li").all_inner_texts()]
    assert legend == ["trees", "grass", "road", "background"]  # + mini-clip's learned "other"
    page.wait_for_selector(".result-layer .leaflet-tile-loaded", timeout=30_000)
    assert page.locator(".leaflet-overlay-pane path").count() >= 1  # polygons
    assert page.locator("#downloads a").count() >= 4
    assert "segment done" in page.inner_text("#status")
    page.fill("#opacity", "0.4")
    page.screenshot(path=str(artifacts / "serve_segment.png"))

    page.fill("#chat-input", "What is in this image?")
    page.click("#chat-send")
    page.wait_for_function("document.querySelector('#chat-log .a') && "
                           "document.querySelector('#chat-log .a').textContent !== '...'", timeout=120_000)
    answer = page.inner_text("#chat-log .a")
    assert answer and not answer.startswith("error"), answer
    page.screenshot(path=str(artifacts / "serve_chat.png"))
    assert not errors, errors
    assert not external, f"the page reached outside the service: {external[:3]}"
    page.close()


def test_errors_show_on_the_page(server: str, browser, artifacts: Path) -> None:
    page = browser.new_page()
    page.goto(server + "/")
    page.wait_for_selector("#file-list li[data-path='OSBS_029.tif']", timeout=30_000)
    page.click("#file-list li[data-path='OSBS_029.tif']")
    page.select_option("#task", "segment")
    page.fill("#prompt", "a, a")
    page.click("#run")
    page.wait_for_selector("#status.error", timeout=60_000)
    assert "failed" in page.inner_text("#status")
    page.screenshot(path=str(artifacts / "serve_error.png"))
    page.close()

"""Headless Chromium (Debian's `chromium`) drives the web page at `/` on the real server process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import SHARED_DATA, colour_image, image_bytes

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.live,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium: apt-get install -y chromium"),
]


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        context = browser.new_context()
        yield context.new_page()
        context.close()
        browser.close()


def test_upload_a_photo_and_read_the_label(server, page, tmp_path):
    photo = tmp_path / "green.jpg"
    photo.write_bytes(image_bytes(colour_image("green", size=(320, 240))))
    page.goto(server.url + "/")
    page.wait_for_function("document.querySelectorAll('#model option').length > 0")
    assert page.locator("#model").input_value() == "colour"
    page.set_input_files("#file", str(photo))
    page.wait_for_selector("#result:not([hidden])", timeout=15000)
    assert page.text_content("#label") == "green"
    assert page.text_content("#confidence").endswith("%")
    assert page.locator("#topk li").count() == 3
    page.screenshot(path=str(os.environ.get("FC_TEST_SCREENSHOT", tmp_path / "page.png")), full_page=True)


def test_the_page_shows_the_served_variant(server, page, tmp_path):
    photo = tmp_path / "red.jpg"
    photo.write_bytes(image_bytes(colour_image("red", size=(200, 160))))
    page.goto(server.url + "/")
    page.wait_for_function("document.querySelector('#version').textContent.length > 0")
    assert page.text_content("#version") == "version 20260101T000000-colour · fp32"  # the colour bundle: fp32 only
    page.set_input_files("#file", str(photo))
    page.wait_for_selector("#result:not([hidden])", timeout=15000)
    assert page.text_content("#timing").startswith("colour 20260101T000000-colour (fp32) · ")


def test_a_real_food_photo_and_a_bad_file(server, page, tmp_path):
    photos = sorted(SHARED_DATA.glob("*/*.jpg"))[:1] if SHARED_DATA.exists() else []
    if photos:
        page.goto(server.url + "/")
        page.set_input_files("#file", str(photos[0]))
        page.wait_for_selector("#result:not([hidden])", timeout=15000)
        assert page.text_content("#label") in {"red", "green", "blue"}  # the colour model's opinion of food
    bad = tmp_path / "notes.jpg"
    bad.write_bytes(b"this is not a photo")
    page.goto(server.url + "/")
    page.set_input_files("#file", str(bad))
    page.wait_for_selector("#error:not([hidden])", timeout=15000)
    assert "invalid_image" in page.text_content("#error")


def test_swagger_docs_render_without_internet(server, page):
    """/docs must not need a CDN: every request leaving the server is refused, and the page still renders."""
    outside = []

    def only_local(route):
        if route.request.url.startswith(server.url):
            return route.continue_()
        outside.append(route.request.url)
        return route.abort()

    page.route("**/*", only_local)
    try:
        page.goto(server.url + "/docs")
        page.wait_for_selector(".opblock-summary-path", timeout=15000)
        paths = page.locator(".opblock-summary-path").all_text_contents()
        assert any("/v1/models/{name}/predict" in p for p in paths), paths
        assert outside == []
    finally:
        page.unroute("**/*")

"""End to end in headless Chromium, by keyboard only: `serve --keep-photos` keeps photos, `label` shows them, keys
label them into the training layout (1-9, n, s, u, a new class), an evicted photo is explained."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from conftest import image_bytes
from test_browser import ARGS, CHROMIUM
from test_label import _wait_up, blocks

from food_classifier.monitoring.labels import PROVENANCE, read_provenance
from food_classifier.testing import ServerProcess, free_port

pytestmark = [
    pytest.mark.browser,
    pytest.mark.live,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium: apt-get install -y chromium"),
]


def _state(url: str) -> dict:
    with urllib.request.urlopen(url + "/api/state", timeout=10) as r:
        return json.loads(r.read())


def test_serve_keep_then_label_by_keyboard(colour_bundle, tmp_path):
    from playwright.sync_api import sync_playwright

    kept, data = tmp_path / "kept", tmp_path / "data"
    args = ["--ort-threads", "1", "--keep-photos", str(kept), "--keep-margin", "1", "--keep-sample", "0"]
    with ServerProcess([colour_bundle], args=args) as srv:
        for i in range(6):
            req = urllib.request.Request(srv.url + "/predict", data=image_bytes(blocks(100 + i)),
                                         headers={"Content-Type": "image/jpeg"})
            urllib.request.urlopen(req, timeout=30).close()
    # stopping the server drains its writer: every photo is on disk now
    assert len(list((kept / "photos").glob("*.jpg"))) == 6

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "food_classifier.cli", "label", str(kept), "--data", str(data),
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_up(url, proc)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
            page = browser.new_page()
            page.goto(url + "/")
            page.wait_for_selector("#card:not([hidden])")

            def sha() -> str:
                page.wait_for_function("document.body.dataset.state === 'ready'")
                return page.get_attribute("#photo", "data-sha")

            def press(key: str, before: str) -> str:
                page.keyboard.press(key)
                page.wait_for_function(f"document.querySelector('#photo').dataset.sha !== '{before}'")
                return sha()

            first = sha()
            top1 = _state(url)["item"]["top"][0][0]
            assert page.locator("#choices button.top").count() == 3
            second = press("1", first)
            assert (data / top1 / f"{first}.jpg").is_file()
            assert page.text_content("#progress").startswith("1 labelled here · photo 2 of 6")
            third = press("n", second)
            assert (data / ".not_food" / f"{second}.jpg").is_file()
            fourth = press("s", third)
            assert press("u", fourth) == third  # undo the skip
            assert press("u", third) == second  # undo "not food": the photo leaves the folder
            assert not (data / ".not_food" / f"{second}.jpg").exists()
            page.keyboard.press("c")
            page.keyboard.type("purple")
            page.keyboard.press("Enter")
            page.wait_for_selector("#error:not([hidden])")
            assert "not a label yet" in page.text_content("#error")
            page.keyboard.press("Enter")  # confirmed: a new class
            page.wait_for_function(f"document.querySelector('#photo').dataset.sha !== '{second}'")
            assert (data / "purple" / f"{second}.jpg").is_file()
            now = sha()
            assert now == third and page.locator("#choices button").nth(3).text_content().endswith("purple")
            fifth = press("4", third)  # the new class is reachable by its key now
            assert (data / "purple" / f"{third}.jpg").is_file()
            # the server (or anyone) evicts the photo on screen: the page says so and moves on
            for p in (kept / "photos").glob(f"{fifth}.*"):
                p.unlink()
            after = press("2", fifth)
            assert "evicted" in page.text_content("#error") and after != fifth
            assert not any(data.glob(f"*/{fifth}.*"))
            page.screenshot(path=str(os.environ.get("FC_TEST_SCREENSHOT_LABEL", tmp_path / "label.png")),
                            full_page=True)
            browser.close()
    finally:
        proc.terminate()
        proc.wait(15)
    labels = read_provenance(data).labels
    assert labels == {first: top1, second: "purple", third: "purple"}
    sources = {json.loads(x)["source"] for x in (data / PROVENANCE).read_text().splitlines()}
    assert sources == {"label page"}
    assert sorted(p.parent.name for p in Path(data).glob("*/*.jpg")) == sorted([top1, "purple", "purple"])

"""The page at / in a real browser (Debian's Chromium driven by Playwright, kept off the network): open an image, click
the object, and the server's mask appears on the canvas where the Predictor says; undo, box, exports.

SAMVIT_SCREENSHOT=docs/img/serve.png pytest tests/test_serve_browser.py  also writes the screenshot kept in docs/.
"""
from __future__ import annotations

import base64
import io
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api")

import samvit  # noqa: E402
from samvit.serve import ServeConfig, create_app  # noqa: E402

from tests._serve_utils import (OBJECT, object_image, official_tiny_sam_1024, png_bytes, running,  # noqa: E402
                          save_full_checkpoint)

CHROMIUM = os.environ.get("SAMVIT_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-default-apps", "--disable-extensions"]
MASK_RGBA = (30, 144, 255, 128)  # app.js

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"no Chromium at {CHROMIUM} (apt-get install "
                                 "chromium, or set SAMVIT_CHROMIUM)")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    d = tmp_path_factory.mktemp("browser")
    ckpt = save_full_checkpoint(official_tiny_sam_1024(seed=0), d / "tiny_sam.safetensors")
    rgb = object_image(480, 640)
    png = d / "object.png"
    png.write_bytes(png_bytes(rgb))
    app = create_app(samvit.Predictor.from_checkpoint(ckpt), ServeConfig(model_name="tiny1024"))
    reference = samvit.Predictor.from_checkpoint(ckpt)
    reference.set_image(rgb)
    with running(app) as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            yield {"url": url, "browser": browser, "rgb": rgb, "png": str(png), "reference": reference, "dir": d}
        finally:
            browser.close()


def _canvas(page) -> np.ndarray:
    url = page.evaluate("document.getElementById('view').toDataURL('image/png')")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGBA"))[..., :3]


def _tinted(canvas: np.ndarray, rgb: np.ndarray) -> np.ndarray:
    """Pixels drawn with the mask colour over the image (nearer the blend than the bare image)."""
    a = MASK_RGBA[3] / 255
    blend = rgb * (1 - a) + np.array(MASK_RGBA[:3]) * a
    c = canvas.astype(np.float64)
    return np.abs(c - blend).sum(-1) < np.abs(c - rgb).sum(-1)


def _click(page, x: float, y: float, **kw) -> None:
    box = page.locator("#view").bounding_box()
    w, h = page.evaluate("[document.getElementById('view').width, document.getElementById('view').height]")
    page.mouse.click(box["x"] + x * box["width"] / w, box["y"] + y * box["height"] / h, **kw)


def _wait_masks(page, n: int) -> None:
    try:
        page.wait_for_function(f"window.samvit.masksDrawn >= {n} && !window.samvit.busy", timeout=60_000)
    except sync_api.TimeoutError:
        state = page.evaluate("({drawn: window.samvit.masksDrawn, busy: window.samvit.busy, "
                              "status: document.getElementById('status').textContent})")
        raise AssertionError(f"mask {n} not drawn within 60 s: {state}") from None


def test_click_to_segment(site):
    rgb, ref = site["rgb"], site["reference"]
    h, w = rgb.shape[:2]
    page = site["browser"].new_page(viewport={"width": 1000, "height": 800})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(site["url"] + "/")
    page.set_input_files("#file", site["png"])
    page.wait_for_function("document.body.dataset.state === 'ready'", timeout=60_000)
    assert "embedded in" in page.text_content("#status")
    np.testing.assert_array_equal(_canvas(page), rgb)  # the image, drawn 1:1, no mask yet

    cx, cy = round(OBJECT[0] * w), round(OBJECT[1] * h)
    _click(page, cx, cy)
    _wait_masks(page, 1)
    masks, scores, _ = ref.predict(np.array([[cx, cy]]), np.array([1]), multimask_output=True)
    expected = masks[int(np.argmax(scores))]
    tinted = _tinted(_canvas(page), rgb)
    yy, xx = np.mgrid[:h, :w]
    away = (yy - cy) ** 2 + (xx - cx) ** 2 > 12 ** 2  # the point marker is drawn over the mask
    assert (tinted == expected)[away].mean() == 1.0  # the page draws exactly the server's mask, at the right place
    disc = (yy - OBJECT[1] * h) ** 2 + (xx - OBJECT[0] * w) ** 2 <= (OBJECT[2] * min(h, w)) ** 2
    assert tinted[disc & away].any() and expected[cy, cx]  # mask pixels where the object is, under the click
    latency = page.evaluate("window.samvit.lastLatencyMs")
    assert 0 < latency < 60_000
    print(f"click-to-mask in Chromium: {latency:.0f} ms; mask covers {expected.mean():.0%} of the image, "
          f"{expected[disc].mean():.0%} of the object")
    shot = site["dir"] / "serve.png"
    page.screenshot(path=str(shot))
    if os.environ.get("SAMVIT_SCREENSHOT"):
        shutil.copy(shot, os.environ["SAMVIT_SCREENSHOT"])

    # exports: the mask PNG as the server made it, and COCO JSON
    with page.expect_download() as d:
        page.click("#export-png")
    got = np.asarray(Image.open(d.value.path()))
    np.testing.assert_array_equal(got > 127, expected)
    with page.expect_download() as d:
        page.click("#export-coco")
    coco = json.loads(open(d.value.path()).read())
    assert coco["images"][0]["width"] == w and coco["annotations"][0]["area"] == int(expected.sum())

    # right click: a background point; undo; a dragged box; clear
    _click(page, 40, 40, button="right")
    _wait_masks(page, 2)
    assert page.evaluate("window.samvit.points.map(p => p.label)") == [1, 0]
    masks, scores, _ = ref.predict(np.array([[cx, cy], [40, 40]]), np.array([1, 0]), multimask_output=False)
    assert (_tinted(_canvas(page), rgb) == masks[0])[away & ((yy - 40) ** 2 + (xx - 40) ** 2 > 144)].mean() == 1.0
    page.click("#undo")
    _wait_masks(page, 3)
    assert page.evaluate("window.samvit.points.length") == 1
    box = page.locator("#view").bounding_box()
    page.mouse.move(box["x"] + 300, box["y"] + 100)
    page.mouse.down()
    page.mouse.move(box["x"] + 500, box["y"] + 300, steps=5)
    page.mouse.up()
    _wait_masks(page, 4)
    assert page.evaluate("window.samvit.box") == [300, 100, 500, 300]
    page.click("#clear")
    page.wait_for_function("window.samvit.mask === null")
    np.testing.assert_array_equal(_canvas(page), rgb)
    # the same file again: answered from the cache, likely before the page's progress estimate arrives
    page.set_input_files("#file", [])
    page.set_input_files("#file", site["png"])
    page.wait_for_function("document.body.dataset.state === 'ready' && document.getElementById('status')"
                           ".textContent.includes('(cached)')", timeout=60_000)
    page.wait_for_timeout(600)  # no progress timer left behind to put the page back into 'encoding'
    assert page.evaluate("document.body.dataset.state") == "ready"
    assert not errors, errors


def test_token_prompt(site):
    """With --token the page asks for it after the first 401, keeps it for the tab, and then works."""
    token = "page-token-1234"
    ckpt = str(site["dir"] / "tiny_sam.safetensors")
    app = create_app(samvit.Predictor.from_checkpoint(ckpt), ServeConfig(model_name="tiny1024", token=token))
    with running(app) as url:
        page = site["browser"].new_page()
        page.goto(url + "/")
        page.set_input_files("#file", site["png"])
        page.wait_for_selector("#token-box", state="visible", timeout=60_000)
        assert "needs a bearer token" in page.text_content("#status")
        page.fill("#token", token)
        page.click("#token-save")
        page.wait_for_function("document.body.dataset.state === 'ready'", timeout=60_000)
        assert page.evaluate("sessionStorage.getItem('samvit-token')") == token
        _click(page, 100, 100)
        _wait_masks(page, 1)

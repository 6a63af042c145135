"""The playground at /: served offline, in step with the API's limits, and working end to end in Chromium.

In process: the page and its assets load from the API itself, nothing names another host, the
page's bounds on request fields are the API's, and the page's route leaves unknown paths and methods
to the API's own errors. Then a real headless Chromium (Debian's `chromium`, driven by playwright,
resolving no host but 127.0.0.1) uses the page against a real API with auth on and a worker serving
the bundled trained models: it sees the API's errors, generates "red circle" with live progress and
previews, and must end with red pictures. Without the chromium binary that test skips, unless
DIT_REQUIRE_TOOLS=1 (as `.ci/run` sets it), where it fails. With DIT_UPDATE_SCREENSHOT=1 it also
writes its screenshot to docs/images/playground.png, which the README shows.
"""

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from playwright.sync_api import Browser, Page, sync_playwright
from redis import Redis

from app.main import create_app
from app.playground import STATIC_DIR
from dit_serve import schemas
from dit_serve.config import get_settings
from dit_serve.keys import create_key
from models.bundled import IMAGE_MODEL_DIR, IMAGE_MODEL_NAME, VIDEO_MODEL_DIR, VIDEO_MODEL_NAME
from tests.conftest import Service, running_service
from tests.test_docs_ui import ASSET_TYPES, CHROMIUM_FLAGS, MIN_ASSET_BYTES, _chromium, references

SCRIPT = STATIC_DIR / "playground.js"
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "images" / "playground.png"
SCREENSHOT_COLOURS = 64  # a palette PNG keeps the committed screenshot small
VIEWPORT = {"width": 1100, "height": 820}
PAGE_TIMEOUT_MS = 30_000
JOB_TIMEOUT_MS = 180_000  # a 50-step job of two outputs on 2 busy CPU cores, with room to spare
STEPS, PREVIEW_EVERY, OUTPUTS, SEED = 50, 5, 2, 1
# A pixel of the drawn shape is saturated (its channels far apart); the background is light grey.
SHAPE_SATURATION = 60
MIN_SHAPE_FRACTION = 0.05
RED_MARGIN = 60  # the shape's mean red exceeds its mean green and blue by at least this

# Recorded by the page under test, from its own DOM: every value its progress bar took, and whether a
# preview was ever shown (a poll from here could miss a job that runs in a second).
RECORDER = """
window.seen = { progress: [], previews: 0 };
document.addEventListener("DOMContentLoaded", () => {
  const bar = document.getElementById("progress");
  new MutationObserver(() => window.seen.progress.push(Number(bar.value)))
    .observe(bar, { attributes: true, attributeFilter: ["value"] });
  new MutationObserver(() => {
    window.seen.previews += document.querySelectorAll("#gallery img.preview").length;
  }).observe(document.getElementById("gallery"), { childList: true, subtree: true });
});
"""
# An output image's pixels, read back through a canvas (a blob: URL of the page's own origin).
PIXELS = """
(img) => {
  const canvas = document.createElement("canvas");
  canvas.width = img.naturalWidth;
  canvas.height = img.naturalHeight;
  const context = canvas.getContext("2d");
  context.drawImage(img, 0, 0);
  const pixels = context.getImageData(0, 0, canvas.width, canvas.height);
  return [canvas.width, canvas.height, Array.from(pixels.data)];
}
"""


# Feeds byte chunks to sse.js's parser through a real Response and collects what it yields.
PARSE = """
async ({ module, chunks }) => {
  const { serverSentEvents } = await import(module);
  const body = new ReadableStream({
    start(controller) {
      chunks.forEach((chunk) => controller.enqueue(new Uint8Array(chunk)));
      controller.close();
    },
  });
  const events = [];
  for await (const event of serverSentEvents(new Response(body))) events.push(event);
  return events;
}
"""


@pytest.fixture
def client(redis_url: str, tmp_path: Path) -> TestClient:
    """The real app in process (its Redis client is never used by the page's own routes)."""
    settings = get_settings(redis_url=redis_url, data_dir=tmp_path, output_dir=tmp_path / "outputs")
    return TestClient(create_app(settings))


def test_playground_loads_only_assets_the_api_serves(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    found = [(kind, url) for kind, url in references(page.text) if not url.startswith("data:")]
    assert {kind for kind, _ in found} == {"script", "stylesheet"}, found
    for kind, url in found:
        assert not urlsplit(url).netloc and not url.startswith("/"), f"{url}: not relative to the page"
        asset = client.get(urljoin("/", url))
        assert asset.status_code == 200, f"{url} answered {asset.status_code}"
        assert asset.headers["content-type"].split(";")[0] in ASSET_TYPES[kind], asset.headers
        assert len(asset.content) >= MIN_ASSET_BYTES
    for asset in STATIC_DIR.iterdir():  # no CDN, font or script from elsewhere, in any of the files
        assert not re.search(r"https?://|\burl\(", asset.read_text()), f"{asset.name} names another host"


def test_playground_limits_are_the_apis() -> None:
    declared = re.search(r"const LIMITS = Object\.freeze\(\{(.*?)\}\)", SCRIPT.read_text())
    assert declared, "playground.js declares no LIMITS"
    limits = {name: float(value) for name, value in re.findall(r"(\w+): ([\d.]+)", declared.group(1))}
    assert limits == {
        "n": schemas.MAX_OUTPUTS,
        "steps": schemas.MAX_STEPS,
        "guidance": schemas.MAX_GUIDANCE,
        "fps": schemas.MAX_FPS,
        "promptChars": schemas.MAX_PROMPT_CHARS,
    }


def test_playground_leaves_other_paths_to_the_api(client: TestClient) -> None:
    """Only GET / is the page's: other methods and unknown paths get the API's own error shape."""
    refused = client.post("/")
    assert refused.status_code == 405 and refused.json()["error"]["code"] == "method_not_allowed"
    missing = client.get("/nothing-here")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert "/" not in client.get("/openapi.json").json()["paths"]


@contextmanager
def _chromium_browser() -> Iterator[Browser]:
    """Debian's chromium under playwright (no `playwright install`), resolving no host but 127.0.0.1."""
    chromium = _chromium()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium, args=[flag for flag in CHROMIUM_FLAGS if flag != "--headless"]
        )
        try:
            yield browser
        finally:
            browser.close()


@pytest.mark.slow
def test_event_stream_parser_in_chromium(redis_url: str, tmp_path: Path) -> None:
    """sse.js, as the page loads it, parses a stream cut at awkward places: inside a field, inside a
    CRLF, inside a UTF-8 character; comments and data-less events are skipped, ids carry over."""
    stream = (
        ': keep-alive\r\nevent: progress\r\nid: 1-0\r\ndata: {"step": 1}\r\n\r\n'
        "event: preview\nid: 2-0\ndata: line one\ndata: caf\u00e9\n\n"
        "data:no space\n\n"
        "event: no-data\n\n"
        "event: completed\ndata: cut off before its blank line\n"
    ).encode()
    cuts = [
        stream.index(b"1-0") + 4,  # between the CR and the LF ending a line inside an event
        stream.index("\u00e9".encode()) + 1,  # between the two bytes of a character
        stream.index(b"no space"),  # after a field's colon
    ]
    chunks = [list(stream[start:end]) for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    svc = Service(redis_url, tmp_path, models={})
    try:
        svc.start_api()
        with _chromium_browser() as browser:
            page = browser.new_page()
            page.goto(f"{svc.base_url}/")
            parsed = page.evaluate(PARSE, {"module": f"{svc.base_url}/playground/sse.js", "chunks": chunks})
    finally:
        svc.stop()
    assert parsed == [
        {"type": "progress", "id": "1-0", "data": '{"step": 1}'},
        {"type": "preview", "id": "2-0", "data": "line one\ncaf\u00e9"},
        {"type": "message", "id": "2-0", "data": "no space"},
    ]


def _shape_pixels(page: Page, image: object) -> tuple[np.ndarray, int]:
    """The (N, 3) RGB values of the image's saturated pixels, and its number of pixels."""
    width, height, data = page.evaluate(PIXELS, image)
    rgb = np.asarray(data, dtype=float).reshape(height, width, 4)[..., :3]
    saturated = rgb.max(axis=-1) - rgb.min(axis=-1) > SHAPE_SATURATION
    return rgb[saturated], width * height


def _save_screenshot(page: Page, tmp_path: Path) -> None:
    shot = tmp_path / "playground.png"
    page.screenshot(path=str(shot), full_page=True)
    if os.environ.get("DIT_UPDATE_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(shot) as image:
            image.convert("RGB").quantize(SCREENSHOT_COLOURS).save(SCREENSHOT, optimize=True)


@pytest.mark.slow
def test_red_circle_in_chromium(redis_url: str, tmp_path: Path) -> None:
    """With auth on: the page shows the API's errors, then a 'red circle' job's progress, its previews,
    and red pictures; the curl command never holds the key; the page loads nothing from elsewhere."""
    models = {IMAGE_MODEL_NAME: IMAGE_MODEL_DIR, VIDEO_MODEL_NAME: VIDEO_MODEL_DIR}
    env = {"DIT_AUTH": "on", "DIT_DEFAULT_MODEL": IMAGE_MODEL_NAME}
    with running_service(redis_url, tmp_path, models, env) as svc, _chromium_browser() as browser:
        _, secret = create_key(Redis.from_url(redis_url), "playground")
        page = browser.new_page(viewport=VIEWPORT)
        page.set_default_timeout(PAGE_TIMEOUT_MS)
        requested: list[str] = []
        page.on("request", lambda request: requested.append(request.url))
        page.add_init_script(RECORDER)
        page.goto(f"{svc.base_url}/")

        # No key yet: the API's 401 is shown, with what to do.
        page.wait_for_selector("#error:not([hidden])")
        assert "unauthorized" in page.inner_text("#error") and "API key" in page.inner_text("#error")

        page.fill("#api-key", secret)
        page.press("#api-key", "Tab")  # leaving the field stores the key and reloads the models
        page.wait_for_selector(f"#model option[value='{VIDEO_MODEL_NAME}']", state="attached")
        assert page.is_hidden("#error")
        page.select_option("#model", VIDEO_MODEL_NAME)  # a video model's form asks for frames, not outputs
        assert page.get_attribute("[name=num_frames]", "max") == "16"
        assert page.locator("[name=n]").count() == 0
        page.select_option("#model", IMAGE_MODEL_NAME)
        assert page.locator("[name=num_frames]").count() == 0

        # A prompt naming no label: the API's 422 is shown, code and message.
        page.fill("[name=prompt]", "purple elephant")
        page.click("#submit")
        page.wait_for_selector("#error:not([hidden])")
        assert "unknown_label" in page.inner_text("#error") and "red circle" in page.inner_text("#error")

        page.fill("[name=prompt]", "red circle")
        page.fill("[name=num_inference_steps]", str(STEPS))
        page.fill("[name=n]", str(OUTPUTS))
        page.fill("[name=seed]", str(SEED))
        page.fill("[name=previews]", str(PREVIEW_EVERY))
        page.click("#submit")
        page.wait_for_function(
            f"document.querySelectorAll('#gallery img.output').length === {OUTPUTS}", timeout=JOB_TIMEOUT_MS
        )
        assert page.is_hidden("#error"), page.inner_text("#error")
        assert page.inner_text("#status").startswith("Completed")
        seen = page.evaluate("window.seen")
        moving = {value for value in seen["progress"] if 0 < value < 100}
        assert len(moving) >= 2 and seen["progress"][-1] == 100, seen["progress"]
        assert seen["previews"] > 0, "no preview was shown while the job ran"

        for image in page.query_selector_all("#gallery img.output"):
            shape, pixels = _shape_pixels(page, image)
            assert len(shape) >= MIN_SHAPE_FRACTION * pixels, f"{len(shape)} of {pixels} pixels saturated"
            red, green, blue = shape.mean(axis=0)
            assert red > green + RED_MARGIN and red > blue + RED_MARGIN, (red, green, blue)
        downloads = page.eval_on_selector_all("#gallery a[download]", "links => links.map(a => a.download)")
        assert len(downloads) == OUTPUTS and all(name.endswith(".png") for name in downloads), downloads

        curl = page.inner_text("#curl")
        assert '"prompt":"red circle"' in curl and "Bearer $DIT_API_KEY" in curl and secret not in curl
        assert "/events" in curl
        _save_screenshot(page, tmp_path)
    outside = [url for url in requested if not url.startswith((svc.base_url, "data:", "blob:"))]
    assert outside == [], f"the page loaded from elsewhere: {outside}"

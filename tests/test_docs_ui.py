"""/docs and /redoc work without internet: every asset the pages load is served by the API itself.

In process, the pages' scripts, stylesheets and favicon are checked to be same-origin and to load.
Then a real headless Chromium (Debian's `chromium`), allowed to resolve nothing but 127.0.0.1,
renders /docs of a real API process and must show its operations. Without the chromium binary that
test skips, unless DIT_REQUIRE_TOOLS=1 (as `.ci/run` sets it), where it fails.
"""

import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from dit_serve.config import get_settings
from tests.conftest import Service

MIN_ASSET_BYTES = 1024  # the favicon is about 5 kB, the scripts and the stylesheet hundreds of kB
ASSET_TYPES = {
    "script": {"text/javascript", "application/javascript"},
    "stylesheet": {"text/css"},
    "icon": {"image/png", "image/x-icon", "image/vnd.microsoft.icon", "image/svg+xml"},
}
# What each page must load (FastAPI's pages: Swagger UI's bundle and CSS, ReDoc's bundle, a favicon).
PAGES = {"/docs": {"script", "stylesheet", "icon"}, "/redoc": {"script", "icon"}}

CHROMIUM_BINARIES = ("chromium", "chromium-browser")
CHROMIUM_TIMEOUT_S = 90
VIRTUAL_TIME_BUDGET_MS = 15_000  # page time Chromium lets pass (scripts, fetches) before dumping
# Headless, no sandbox (tests may run as root), no background traffic, and no host but loopback.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
)
RENDERED_OPERATION = 'data-path="/v1/images"'  # Swagger UI's operation list, built from /openapi.json


class References(HTMLParser):
    """The URLs a page loads, each with its kind: script, stylesheet or icon."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "script" and attributes.get("src"):
            self.found.append(("script", attributes["src"] or ""))
        elif tag == "link" and attributes.get("href"):
            rel = set((attributes.get("rel") or "").split())
            kind = "icon" if "icon" in rel else "stylesheet" if "stylesheet" in rel else f"link {rel}"
            self.found.append((kind, attributes["href"] or ""))


def references(html: str) -> list[tuple[str, str]]:
    parser = References()
    parser.feed(html)
    return parser.found


@pytest.fixture
def client(redis_url: str, tmp_path: Path) -> TestClient:
    """The real app in process (its Redis client is never used by these pages)."""
    settings = get_settings(redis_url=redis_url, data_dir=tmp_path, output_dir=tmp_path / "outputs")
    return TestClient(create_app(settings))


def test_references_are_parsed() -> None:
    html = (
        '<link rel="stylesheet" href="/a.css"><link rel="shortcut icon" href="https://x.org/f.png">'
        '<script src="//cdn.example/b.js"></script><script>inline()</script>'
    )
    assert references(html) == [
        ("stylesheet", "/a.css"),
        ("icon", "https://x.org/f.png"),
        ("script", "//cdn.example/b.js"),
    ]


@pytest.mark.parametrize("page", sorted(PAGES))
def test_docs_pages_load_only_assets_the_api_serves(client: TestClient, page: str) -> None:
    """Every script, stylesheet and favicon of the page is a path on this API, and loads."""
    answer = client.get(page)
    assert answer.status_code == 200, answer.text
    found = references(answer.text)
    assert {kind for kind, _ in found} == PAGES[page], f"{page} loads {found}"
    for kind, url in found:
        parts = urlsplit(url)
        assert not parts.scheme and not parts.netloc and url.startswith("/"), (
            f"{page} loads its {kind} from another host: {url}"
        )
        asset = client.get(url)
        assert asset.status_code == 200, f"{page}: {url} answered {asset.status_code}"
        content_type = asset.headers["content-type"].split(";")[0].strip()
        assert content_type in ASSET_TYPES[kind], f"{page}: {url} is {content_type}, not a {kind}"
        assert len(asset.content) >= MIN_ASSET_BYTES, f"{page}: {url} is {len(asset.content)} bytes"


def test_swagger_oauth2_redirect_is_served(client: TestClient) -> None:
    """Swagger UI's OAuth2 redirect page, which /docs names, answers and loads nothing from elsewhere."""
    url = client.app.swagger_ui_oauth2_redirect_url  # type: ignore[attr-defined]
    assert url and url in client.get("/docs").text
    answer = client.get(url)
    assert answer.status_code == 200 and "oauth2" in answer.text.lower()
    assert references(answer.text) == []


def _chromium() -> str:
    for name in CHROMIUM_BINARIES:
        if path := shutil.which(name):
            return path
    message = "chromium is not installed: `apt-get install chromium` (Debian) provides it"
    if os.environ.get("DIT_REQUIRE_TOOLS") == "1":
        pytest.fail(message)
    pytest.skip(message)


@pytest.mark.slow
def test_swagger_ui_renders_offline_in_chromium(redis_url: str, tmp_path: Path) -> None:
    """Headless Chromium, resolving no host but 127.0.0.1, renders the operations of a real API's /docs."""
    chromium = _chromium()
    svc = Service(redis_url, tmp_path, models={})
    try:
        svc.start_api()
        dumped = subprocess.run(
            [
                chromium,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={tmp_path / 'chromium-profile'}",
                f"--virtual-time-budget={VIRTUAL_TIME_BUDGET_MS}",
                "--dump-dom",
                f"{svc.base_url}/docs",
            ],
            capture_output=True,
            text=True,
            timeout=CHROMIUM_TIMEOUT_S,
        )
    finally:
        svc.stop()
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    assert RENDERED_OPERATION in dumped.stdout, (
        f"Swagger UI did not render the operations; DOM: {dumped.stdout[-2000:]}\n"
        f"chromium: {dumped.stderr[-2000:]}"
    )

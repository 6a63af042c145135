"""The playground: a page at / that tries the API from a browser, served without internet access.

Four static files (app/static/playground: the page, its two ES modules and its stylesheet), no build
step and nothing from another host. The page is a plain client of the public API (GET /v1/models, POST
/v1/images|videos, GET /v1/jobs/{id}/events, GET /v1/jobs/{id}/outputs/{k}), so it needs no route of
its own beyond these files, and no API key: the visitor types one into the page when auth is on.

Only GET / is a route; the assets are mounted under ASSETS_URL rather than at /, because a catch-all
mount at / would answer every unknown path and method itself, bypassing the API's own 404 and 405.
The page names its assets and the API by relative URLs, so it also works under a proxy's prefix.
"""

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

PLAYGROUND_URL = "/"
ASSETS_URL = "/playground"
STATIC_DIR = Path(__file__).resolve().parent / "static" / "playground"
INDEX = STATIC_DIR / "index.html"


def install_playground(app: FastAPI) -> None:
    """Serve the playground page at / and its script and stylesheet under /playground."""
    app.mount(ASSETS_URL, StaticFiles(directory=STATIC_DIR), name="playground-assets")

    @app.get(PLAYGROUND_URL, include_in_schema=False)
    def playground() -> FileResponse:
        return FileResponse(INDEX, media_type="text/html")

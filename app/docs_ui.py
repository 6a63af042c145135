"""The interactive API docs, /docs (Swagger UI) and /redoc (ReDoc), served without internet access.

FastAPI's own pages load their scripts and CSS from cdn.jsdelivr.net, the favicon from
fastapi.tiangolo.com and ReDoc's fonts from Google, so on an offline machine they stay blank. The same
assets (swagger-ui-dist 5, redoc 2, FastAPI's favicon) ship as package data of the `fastapi-offline`
package; they are served here with StaticFiles under ASSETS_URL, and the pages are FastAPI's own
(`get_swagger_ui_html`, `get_redoc_html`) pointed at them. ReDoc is served offline too, with its
fallback fonts instead of Google's. See https://fastapi.tiangolo.com/how-to/custom-docs-ui-assets/.
"""

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

DOCS_URL = "/docs"
REDOC_URL = "/redoc"
ASSETS_URL = "/docs-assets"
ASSETS_PACKAGE = ("fastapi_offline", "static")  # (package, its folder of static files)
SWAGGER_JS, SWAGGER_CSS = "swagger-ui-bundle.js", "swagger-ui.css"
REDOC_JS, FAVICON = "redoc.standalone.js", "favicon.png"


def install_docs_ui(app: FastAPI) -> None:
    """Serve /docs, its OAuth2 redirect and /redoc from the packaged assets.

    Args:
        app: an app created with `docs_url=None, redoc_url=None`, so that FastAPI's CDN pages are off.
    """
    if app.docs_url or app.redoc_url or not app.openapi_url:
        raise ValueError("create the app with docs_url=None and redoc_url=None, and an openapi_url")
    openapi_url = app.openapi_url
    oauth2_redirect_url = app.swagger_ui_oauth2_redirect_url  # FastAPI's default: /docs/oauth2-redirect
    app.mount(ASSETS_URL, StaticFiles(packages=[ASSETS_PACKAGE]), name="docs-assets")

    def root(request: Request) -> str:
        """The prefix the app is served under (behind a proxy), as FastAPI's own pages use it."""
        return str(request.scope.get("root_path", "")).rstrip("/")

    @app.get(DOCS_URL, include_in_schema=False)
    def swagger_ui(request: Request) -> HTMLResponse:
        prefix = root(request)
        return get_swagger_ui_html(
            openapi_url=prefix + openapi_url,
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{prefix}{ASSETS_URL}/{SWAGGER_JS}",
            swagger_css_url=f"{prefix}{ASSETS_URL}/{SWAGGER_CSS}",
            swagger_favicon_url=f"{prefix}{ASSETS_URL}/{FAVICON}",
            oauth2_redirect_url=prefix + oauth2_redirect_url if oauth2_redirect_url else None,
            init_oauth=app.swagger_ui_init_oauth,
            swagger_ui_parameters=app.swagger_ui_parameters,
        )

    if oauth2_redirect_url:

        @app.get(oauth2_redirect_url, include_in_schema=False)
        def swagger_ui_oauth2_redirect() -> HTMLResponse:
            return get_swagger_ui_oauth2_redirect_html()

    @app.get(REDOC_URL, include_in_schema=False)
    def redoc(request: Request) -> HTMLResponse:
        prefix = root(request)
        return get_redoc_html(
            openapi_url=prefix + openapi_url,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{prefix}{ASSETS_URL}/{REDOC_JS}",
            redoc_favicon_url=f"{prefix}{ASSETS_URL}/{FAVICON}",
            with_google_fonts=False,
        )

"""The browser demo: ``/`` and its three static files from ``service/web/`` (no build step).

Only the files listed here are served, so no request path ever reaches the file system.
The page is public (it holds no data); the API calls it makes carry the user's key.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
STATIC_FILES = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
# The page is tiny and changes with the server version: always revalidate, so an upgrade is seen at once.
_CACHE = {"Cache-Control": "no-cache"}

router = APIRouter(tags=["web"])


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(WEB_DIR / "index.html", media_type="text/html; charset=utf-8", headers=_CACHE)


@router.get("/static/{name}", include_in_schema=False)
async def static(name: str) -> FileResponse:
    media_type = STATIC_FILES.get(name)
    if media_type is None:
        raise HTTPException(404, f"no static file {name!r}")
    return FileResponse(WEB_DIR / name, media_type=media_type, headers=_CACHE)

"""The labelling page: a small FastAPI app of its own on loopback (the serving core knows nothing of it).

    GET  /                the page (static/label.html, the demo page's stylesheet)
    GET  /api/state       the current photo, its top-3, all labels, progress, problems found at start
    GET  /photo/{sha256}  the kept photo
    POST /api/label       {"sha256", "label", "new": false}   written at once, then the next photo
    POST /api/skip        {"sha256"}
    POST /api/undo

Errors are JSON `{"error": code, "detail": message}` with a 4xx status: 409 locked / nothing to undo, 410 the
photo was evicted, 422 an unknown label or a class name that cannot be a folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from food_classifier.labeling.session import Session, SessionError

STATIC = Path(__file__).resolve().parent / "static"
HOUSE_STYLE = Path(__file__).resolve().parents[1] / "serving" / "http" / "static" / "style.css"  # a file, not an import


class LabelIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sha256: str = Field(max_length=64)
    label: str = Field(max_length=200)
    new: bool = False


class SkipIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sha256: str = Field(max_length=64)


def create_app(session: Session) -> FastAPI:
    app = FastAPI(title="food-classifier label", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(SessionError)
    async def _session_error(request: Request, exc: SessionError) -> JSONResponse:
        return JSONResponse({"error": exc.code, "detail": str(exc), **session.state()}, status_code=exc.status)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "label.html", headers={"Cache-Control": "no-store"})

    @app.get("/static/style.css", include_in_schema=False)
    def style() -> FileResponse:
        return FileResponse(HOUSE_STYLE)

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> FileResponse:
        if name not in ("label.js", "label.css"):
            raise SessionError(f"no such file: {name[:80]}", 404, "not_found")
        return FileResponse(STATIC / name)

    @app.get("/api/state")
    def state() -> dict[str, Any]:
        return session.state()

    @app.get("/photo/{sha256}")
    def photo(sha256: str) -> FileResponse:
        return FileResponse(session.photo(sha256), headers={"Cache-Control": "private, max-age=3600"})

    @app.post("/api/label")
    def label(body: LabelIn) -> dict[str, Any]:
        return session.label(body.sha256, body.label, body.new)

    @app.post("/api/skip")
    def skip(body: SkipIn) -> dict[str, Any]:
        return session.skip(body.sha256)

    @app.post("/api/undo")
    def undo() -> dict[str, Any]:
        return session.undo()

    return app

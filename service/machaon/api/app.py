"""The FastAPI application: the REST API, /metrics, /healthz, /readyz and the web page.

`create_app(settings, store, hooks)` builds it; `hooks` are what the process around it offers
(`machaon serve` wakes its workers and dispatcher, answers whether its DICOM listener accepts, and
shows its ONNX Runtime sessions); `machaon api` alone offers none of them. Every error is JSON
{"error": message}, the message saying what was wrong and what to do.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from .. import operations as ops
from ..config import Settings
from ..inference import OrtSessions
from ..store import Store
from . import rest
from .auth import AuthError

log = logging.getLogger("machaon.api")

STATIC = Path(__file__).with_name("static")


@dataclass
class Hooks:
    """What the process serving the API lets it do or see; None where it has no such part."""

    jobs_queued: Callable[[], None] | None = None  # wake the workers: jobs were queued
    deliveries_due: Callable[[], None] | None = None  # wake the dispatcher: deliveries are due now
    studies_completed: Callable[[], None] | None = None  # plan now what was completed by hand
    listener_problem: Callable[[], str | None] | None = None  # None while the DICOM listener accepts
    ort_sessions: OrtSessions | None = None  # this process's ONNX Runtime sessions

    def call(self, hook: Callable[[], None] | None) -> None:
        """Run a wake-up hook; one that fails is logged, since the action it follows is done."""
        if hook is None:
            return
        try:
            hook()
        except Exception:
            log.exception("could not wake the service after an API action")


def create_app(settings: Settings, store: Store, hooks: Hooks | None = None) -> FastAPI:
    app = FastAPI(title="machaon", version=_version(), docs_url=None, redoc_url=None,
                  openapi_url="/api/openapi.json",
                  description="Studies, jobs, deliveries and events of a machaon service; retry, cancel, "
                              "reprocess. Send `Authorization: Bearer TOKEN` (`machaon tokens create`).")
    app.state.settings, app.state.store, app.state.hooks = settings, store, hooks or Hooks()
    _handle_errors(app)
    app.include_router(rest.router)
    app.include_router(rest.service)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    _add_docs(app)
    _add_page(app)
    return app


# Swagger UI, vendored from npm (swagger-ui-dist, with its licence in static/): hospital networks
# often cannot reach a CDN.
SWAGGER_UI = "5.35.0"


def _add_docs(app: FastAPI) -> None:
    @app.get("/api/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/api/openapi.json", title="machaon API",
                                   swagger_js_url=f"/static/swagger-ui-{SWAGGER_UI}-bundle.js",
                                   swagger_css_url=f"/static/swagger-ui-{SWAGGER_UI}.css",
                                   swagger_favicon_url="data:,")


def _add_page(app: FastAPI) -> None:
    try:
        page = importlib.import_module(f"{__package__}.page")
    except ModuleNotFoundError as exc:  # a build without the web page serves the API alone
        if exc.name != f"{__package__}.page":
            raise
        return
    app.include_router(page.router)


def _version() -> str:
    try:
        return version("machaon")
    except PackageNotFoundError:
        return "unknown"


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _handle_errors(app: FastAPI) -> None:
    @app.exception_handler(ops.OperationError)
    async def operation_error(_request: Request, exc: ops.OperationError) -> JSONResponse:
        return _error(exc.status_code, str(exc))

    @app.exception_handler(AuthError)
    async def auth_error(_request: Request, exc: AuthError) -> JSONResponse:
        return _error(exc.status_code, str(exc), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, "; ".join(_describe(e) for e in exc.errors()))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no such page or endpoint: {request.url.path} (the API is described at /api/docs)"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path} (see /api/docs)"
        return _error(exc.status_code, message, getattr(exc, "headers", None))

    @app.middleware("http")
    async def internal_error(request: Request, call_next):
        # Here rather than as an exception handler, which Starlette follows by raising the
        # exception again for the server to log a second time.
        try:
            return await call_next(request)
        except Exception as exc:
            log.exception("%s %s failed", request.method, request.url.path)
            # The exception's text may quote SQL and its values: only its type goes out.
            return _error(500, f"internal error: {type(exc).__name__} while serving {request.url.path} "
                               "(details in the service log)")


def _describe(error: dict) -> str:
    """One validation error as `limit (query): Input should be greater than 0`."""
    where, *path = error.get("loc") or ("request",)
    name = ".".join(str(p) for p in path) or where
    return f"{name} ({where}): {error.get('msg', 'invalid')}" if path else f"{where}: {error.get('msg')}"

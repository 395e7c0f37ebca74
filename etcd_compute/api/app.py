"""The API server's application: its routes (v1.py, the REST API; ui.py, the dashboard),
errors as JSON (or as pages under /ui), the OpenAPI document as the API behaves, metrics.

Every request is answered by eschedule's Operations, made per request for the caller's
project (scoped unless the token is an admin's), on one etcd and one Placement client
that all requests share (context.py). Handlers are plain functions: FastAPI runs them in
its thread pool, as the clients they call block.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from etcd_compute.api import ui, v1
from etcd_compute.api.context import Server, error_body, http_status, invalid
from etcd_compute.config import ScheduleConfig
from etcd_compute.errors import ECError, Unauthenticated, UsageError
from etcd_compute.states import Actual, Desired


def _enum(prop: dict[str, Any], values: list[str]) -> None:
    """Give a string property (or the string branch of an optional one) its allowed values."""
    for branch in prop.get("anyOf", [prop]):
        if branch.get("type") == "string":
            branch["enum"] = values


def _described(app: FastAPI, doc: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI document as the API behaves: the bearer token every call needs, errors as they
    are sent (400 with the error body: FastAPI's 422 never is), and the values of states and actions."""
    for ops in doc["paths"].values():
        for op in ops.values():
            op["responses"].pop("422", None)
            for param in op.get("parameters", []):
                if param["name"] == "state":
                    _enum(param["schema"], list(Actual))
    components = doc.setdefault("components", {})
    schemas = components.get("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    enums: list[tuple[str, str, list[str]]] = [
        ("View", "state", list(Actual)), ("View", "desired", list(Desired)), ("View", "host_state", ["UP", "DOWN"]),
        ("Destroyed", "state", ["DELETING", "DELETED"])]
    for name, field, values in enums:
        if field in schemas.get(name, {}).get("properties", {}):
            _enum(schemas[name]["properties"][field], values)
    components["securitySchemes"] = {"bearer": {
        "type": "http", "scheme": "bearer", "bearerFormat": "ect_<id>_<secret>",
        "description": "A token from `eschedule token create PROJECT [--admin]`"}}
    doc["security"] = [{"bearer": []}]
    app.openapi_schema = doc
    return doc


def create_app(cfg: ScheduleConfig) -> FastAPI:
    server = Server(cfg)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        ui.stop(app)
        server.close()

    app = FastAPI(title="etcd-compute", version="1", openapi_url="/v1/openapi.json",
                  description="VMs placed by OpenStack Placement, requested through etcd, run by libvirt. Every "
                              "call carries `Authorization: Bearer <token>` (`eschedule token create`); errors are "
                              '`{"error": {"type", "message", "exit_code"}}` with the exit code eschedule gives.',
                  docs_url=None, redoc_url=None,  # their pages load scripts from a CDN: none here
                  lifespan=lifespan)
    app.state.server = server
    app.include_router(v1.router)
    app.include_router(ui.router)
    ui.mount(app)

    @app.exception_handler(ECError)
    def on_error(request: Request, exc: ECError) -> Response:
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthenticated) else None
        if request.url.path.startswith("/ui"):
            return ui.error_page(request, exc, http_status(exc))
        return JSONResponse(error_body(exc), http_status(exc), headers=headers)

    @app.exception_handler(StarletteHTTPException)
    def on_http(request: Request, exc: StarletteHTTPException) -> Response:
        """Starlette's own answers (no such route, method not allowed): a page under /ui, the
        API's error body elsewhere (a wrong path or method is bad input: exit code 2)."""
        if request.url.path.startswith("/ui"):
            return ui.error_page(request, ECError(str(exc.detail)), exc.status_code)
        return JSONResponse({"error": {"type": "HTTPException", "message": str(exc.detail), "exit_code": 2}},
                            exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    def on_invalid(request: Request, exc: RequestValidationError) -> Response:
        return on_error(request, UsageError(invalid(exc.errors())))

    app.openapi = lambda: app.openapi_schema or _described(app, FastAPI.openapi(app))  # type: ignore[method-assign]

    @app.middleware("http")
    async def measure(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        t0 = time.monotonic()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        if path != "/ui/events":  # a stream's duration is its viewer's, not the server's
            server.metrics.requests.labels(request.method, path, str(response.status_code)).observe(
                time.monotonic() - t0)
        return response

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app

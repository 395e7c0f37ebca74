"""The API server's application: shared clients, who is calling, errors as JSON, metrics.

Every request is answered by eschedule's Operations, made per request for the caller's
project (scoped unless the token is an admin's), on one etcd and one Placement client
that all requests share. Handlers are plain functions: FastAPI runs them in its thread
pool, as the clients they call block.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from etcd_compute.api.schemas import ErrorBody
from etcd_compute.config import ScheduleConfig
from etcd_compute.contract import Request as InstanceRequest
from etcd_compute.contract import Token
from etcd_compute.errors import (
    ECError,
    EtcdUnavailable,
    Forbidden,
    InvalidState,
    NoCapacity,
    PlacementError,
    PlacementUnavailable,
    QuotaExceeded,
    Unauthenticated,
    UnknownInstance,
    UsageError,
    WaitFailed,
)
from etcd_compute.eschedule.operations import Operations
from etcd_compute.states import Actual, Desired, Role

LOG = logging.getLogger(__name__)

# The CLI's failures as HTTP statuses (the body carries the CLI's exit code as well). Most
# specific first: PlacementUnavailable is a kind of nothing else, Unauthenticated of Forbidden.
STATUS: list[tuple[type[ECError], int]] = [
    (Unauthenticated, 401), (Forbidden, 403), (QuotaExceeded, 403), (UsageError, 400), (UnknownInstance, 404),
    (NoCapacity, 409), (InvalidState, 409), (WaitFailed, 504), (PlacementUnavailable, 503),
    (EtcdUnavailable, 503), (PlacementError, 502), (ECError, 500),
]


# For the OpenAPI document: what an error answer looks like.
ErrorResponses: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": ", ".join(k.__name__ for k, c in STATUS if c == code)}
    for code in sorted({c for _, c in STATUS})}


def http_status(exc: ECError) -> int:
    return next(code for kind, code in STATUS if isinstance(exc, kind))


def error_body(exc: ECError) -> dict[str, Any]:
    return {"error": {"type": type(exc).__name__, "message": str(exc), "exit_code": exc.exit_code}}


@dataclass
class Caller:
    """Who is calling, and the operations they may run (scoped to their project unless admin)."""

    token: Token
    ops: Operations

    @property
    def admin(self) -> bool:
        return self.token["role"] == Role.ADMIN

    def require_admin(self, what: str) -> None:
        if not self.admin:
            raise Forbidden(f"only an admin token may {what}")


class Metrics:
    """The API server's own series (its registry, so that tests may build several apps)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Histogram("etcd_compute_api_request_duration_seconds", "API requests by route and status",
                                  ["method", "route", "status"], registry=self.registry)
        self.claims = Counter("etcd_compute_api_schedules_total",
                              "Schedules (claims) through the API and dashboard, by result", ["result"],
                              registry=self.registry)


class Server:
    """What all requests share: the config and one unscoped Operations, whose clients every
    caller's operations share (made on first use: the server starts, and answers 503, while etcd
    or Placement is down)."""

    def __init__(self, cfg: ScheduleConfig) -> None:
        self.cfg = cfg
        self.metrics = Metrics()
        self.ops = Operations(cfg)

    def caller(self, token: str | None, project: str | None = None) -> Caller:
        """The caller presenting `token`; admins may name another `project` (and then see only it)."""
        record = self.ops.authenticate(token or "")
        admin = record["role"] == Role.ADMIN
        if project is not None and not admin and project != record["project"]:
            raise Forbidden("only an admin token may name another project")
        scoped = not admin or project is not None
        return Caller(record, self.ops.acting_for(project or record["project"], scoped=scoped))

    def schedule(self, caller: Caller, query: str | None, **kwargs: Any) -> InstanceRequest:
        """Schedule for `caller`, counted by result (the API and the dashboard both come here)."""
        try:
            request = caller.ops.schedule(query, **kwargs)
        except ECError as exc:
            self.metrics.claims.labels(type(exc).__name__).inc()
            raise
        self.metrics.claims.labels("placed").inc()
        return request

    def close(self) -> None:
        self.ops.close()


def invalid(errors: Any) -> str:
    """One line for what pydantic found wrong with a request: where, and what."""
    first = dict(errors[0]) if errors else {}
    loc = [str(p) for p in first.get("loc", ())]
    where = ".".join(p for p in loc if p != "body")
    kind, msg = first.get("type"), first.get("msg", "invalid")
    if kind == "json_invalid":
        return f"the body is not JSON: {(first.get('ctx') or {}).get('error', 'malformed')}"
    if loc == ["body"]:
        return "a JSON object is required as the body" if kind == "missing" else \
            f"the body must be a JSON object (content-type application/json): {msg}"
    return f"{where}: {msg}" if where else f"invalid request: {msg}"


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


def bearer(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def create_app(cfg: ScheduleConfig) -> FastAPI:
    from etcd_compute.api import ui, v1  # the routes need the Server type above

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

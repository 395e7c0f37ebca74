"""What every API request shares: who is calling (Caller), the server's clients and metrics
(Server), and how eschedule's failures become HTTP answers. The app (app.py) and its routes
(v1.py, ui.py, graphs.py) all stand on this; it imports none of them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from prometheus_client import CollectorRegistry, Counter, Histogram

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
from etcd_compute.states import Role

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


def bearer(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None

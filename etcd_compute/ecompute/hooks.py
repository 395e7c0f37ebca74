"""What the daemon tells its metrics as it works: hooks that do nothing unless metrics are served.

A host without `metrics` set never loads prometheus_client or the metrics server (metrics.py
overrides these hooks); the daemon calls the same hooks either way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from etcd_compute.contract import Request, Status
    from etcd_compute.ecompute.jobs import JobKind, JobResult


class MetricsHooks:
    """No metrics: every hook is a no-op."""

    def seen(self, uuid: str, requested: bool, request: Request | None, status: Status | None) -> None:
        """The daemon read an instance: `requested` if this host has a request for it (`request`
        None: a malformed one), with its status."""

    def recorded(self, uuid: str, state: str) -> None:
        """The daemon wrote the instance's actual state."""

    def forget(self, uuid: str) -> None:
        """The instance is gone from this host (deleted)."""

    def set_inventory(self, inventory: dict[str, dict[str, float | int]]) -> None:
        """What the host offers Placement."""

    def job_done(self, kind: JobKind, result: JobResult) -> None:
        """A worker ended a job of `kind`."""

    def became_active(self, request: Request, status: Status | None) -> None:
        """A build made the instance ACTIVE."""

    def guest_ready(self, seconds: float | None) -> None:
        """A guest said its boot has finished, `seconds` after the host started its domain (None: unknown)."""

    def watch_state(self, state: str, endpoint: str) -> None:
        """The request watch's state (etcd.PrefixWatch: down, up, compacted) and the etcd endpoint in use."""

    def lease_refresh_failed(self, reason: str) -> None:
        """A refresh of the host's liveness lease failed (error, expired)."""

    def loop_restarted(self, loop: str) -> None:
        """A long-lived loop of the daemon died (or stopped beating) and was started again."""

    def lease_lapsed(self) -> None:
        """The host could not prove its lease in time: its fence stops its domains."""

    def health(self, healthy: bool) -> None:
        """The hypervisor stopped (False) or started again (True) answering."""

    def close(self) -> None:
        """The daemon stops."""

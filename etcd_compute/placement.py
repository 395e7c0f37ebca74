"""A small OpenStack Placement client: the calls etcd-compute makes, and readable errors.

Only connection errors are retried (the request never reached Placement, so a
retry cannot claim twice); everything Placement answers is returned or raised
as PlacementError with Placement's own error code and detail.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import requests

from etcd_compute.config import PlacementConfig
from etcd_compute.errors import PlacementError, PlacementUnavailable

LOG = logging.getLogger(__name__)

CONCURRENT_UPDATE = "placement.concurrent_update"


class PlacementClient:
    def __init__(self, cfg: PlacementConfig) -> None:
        self.base = cfg.endpoint.rstrip("/")
        self.timeout = cfg.timeout
        self.retries = cfg.retries
        self.session = requests.Session()
        self.session.headers.update({
            "x-auth-token": cfg.token,
            "OpenStack-API-Version": f"placement {cfg.microversion}",
            "Accept": "application/json",
        })

    def request(self, method: str, path: str, *, json: Any = None, params: Any = None,
                ok: tuple[int, ...] = (200, 201, 204)) -> requests.Response:
        url = self.base + path
        for attempt in range(self.retries + 1):
            try:
                resp = self.session.request(method, url, json=json, params=params, timeout=self.timeout)
                break
            except requests.ConnectionError as exc:
                if attempt == self.retries:
                    raise PlacementUnavailable(f"Placement unreachable at {self.base}: {_reason(exc)}") from None
                time.sleep(0.2 * 2 ** attempt)
            except requests.Timeout:
                raise PlacementUnavailable(f"Placement at {self.base} did not answer in {self.timeout}s") from None
        if resp.status_code not in ok:
            raise _error(method, path, resp)
        return resp

    # -- scheduling -------------------------------------------------------------------------

    def allocation_candidates(self, params: list[tuple[str, str]]) -> dict:
        return self.request("GET", "/allocation_candidates", params=params).json()

    def claim(self, consumer: str, allocations: dict, project_id: str, user_id: str) -> None:
        """Allocate for a new consumer; raises PlacementError(409) when someone was faster."""
        self.request("PUT", f"/allocations/{consumer}", json={
            "allocations": allocations, "project_id": project_id, "user_id": user_id,
            "consumer_generation": None, "consumer_type": "INSTANCE"})

    def move(self, consumer: str, allocations: dict, generation: int | None, project_id: str,
             user_id: str) -> None:
        """Replace an existing consumer's allocations in one step (evacuation), only if the
        consumer is still at `generation` (409 "consumer generation conflict" otherwise)."""
        self.request("PUT", f"/allocations/{consumer}", json={
            "allocations": allocations, "project_id": project_id, "user_id": user_id,
            "consumer_generation": generation, "consumer_type": "INSTANCE"})

    def consumer(self, consumer: str) -> dict:
        return self.request("GET", f"/allocations/{consumer}").json()

    def provider_allocations(self, uuid: str) -> dict:
        return self.request("GET", f"/resource_providers/{uuid}/allocations").json()["allocations"]

    def get_allocations(self, consumer: str) -> dict:
        return self.request("GET", f"/allocations/{consumer}").json().get("allocations", {})

    def delete_allocations(self, consumer: str) -> bool:
        """Free a consumer's allocations; False if it had none (already freed)."""
        return self.request("DELETE", f"/allocations/{consumer}", ok=(204, 404)).status_code == 204

    # -- providers --------------------------------------------------------------------------

    def providers(self) -> list[dict]:
        return self.request("GET", "/resource_providers").json()["resource_providers"]

    def provider(self, uuid: str) -> dict | None:
        resp = self.request("GET", f"/resource_providers/{uuid}", ok=(200, 404))
        return resp.json() if resp.status_code == 200 else None

    def ensure_provider(self, uuid: str, name: str) -> dict:
        """Create the provider, or rename it if it exists under another name."""
        current = self.provider(uuid)
        if current is None:
            return self.request("POST", "/resource_providers", json={"uuid": uuid, "name": name}).json()
        if current["name"] != name:
            return self.request("PUT", f"/resource_providers/{uuid}", json={"name": name}).json()
        return current

    def delete_provider(self, uuid: str) -> bool:
        """Remove a provider with every allocation on it (retiring a host); False if absent."""
        if self.provider(uuid) is None:
            return False
        for consumer in self.provider_allocations(uuid):
            self.delete_allocations(consumer)
        self.request("DELETE", f"/resource_providers/{uuid}", ok=(204, 404))
        return True

    def inventories(self, uuid: str) -> dict:
        return self.request("GET", f"/resource_providers/{uuid}/inventories").json()["inventories"]

    def usages(self, uuid: str) -> dict:
        return self.request("GET", f"/resource_providers/{uuid}/usages").json()["usages"]

    def traits(self, uuid: str) -> list[str]:
        return self.request("GET", f"/resource_providers/{uuid}/traits").json()["traits"]

    def set_inventories(self, uuid: str, inventories: dict) -> None:
        """Replace the provider's inventory; claims bump the generation, so retry on conflict."""
        self._put_generational(f"/resource_providers/{uuid}/inventories", {"inventories": inventories})

    def set_traits(self, uuid: str, traits: list[str]) -> None:
        for trait in traits:
            if trait.startswith("CUSTOM_"):
                self.request("PUT", f"/traits/{trait}")
        self._put_generational(f"/resource_providers/{uuid}/traits", {"traits": sorted(set(traits))})

    def _put_generational(self, path: str, body: dict, attempts: int = 10) -> None:
        provider = path.split("/")[2]
        for attempt in range(attempts):
            current = self.provider(provider)
            if current is None:
                raise PlacementError(f"resource provider {provider} does not exist", 404)
            try:
                self.request("PUT", path, json=dict(body, resource_provider_generation=current["generation"]))
                return
            except PlacementError as exc:
                if exc.code != CONCURRENT_UPDATE or attempt == attempts - 1:
                    raise
                time.sleep(0.05 * (attempt + 1))


def _reason(exc: Exception) -> str:
    text = str(exc)
    for marker in ("Connection refused", "Name or service not known", "timed out", "No route to host"):
        if marker in text:
            return marker
    return text[:200]


def _error(method: str, path: str, resp: requests.Response) -> PlacementError:
    """Placement's JSON error body turned into one readable line."""
    code, detail = "", resp.text.strip()
    try:
        err = resp.json()["errors"][0]
        code = err.get("code", "")
        detail = err.get("detail", detail)
    except (ValueError, KeyError, IndexError, TypeError):
        pass
    # Placement prefixes the useful sentence with the generic HTTP explanation.
    detail = " ".join(detail.split("\n\n", 1)[-1].split())
    return PlacementError(f"Placement {method} {path.split('?')[0]} -> {resp.status_code}: {detail}",
                          resp.status_code, code)

"""The API server (/v1) and what it shares with the CLI: tokens, projects, quotas, errors.

Each test runs a real `eapi` on its own prefix beside test:///default hosts, and checks
outcomes where they land: etcd, Placement's usages and consumers, the CLI's view.
"""

from __future__ import annotations

import concurrent.futures
import json
from typing import Any

import pytest
import requests
from openapi_spec_validator import validate
from prometheus_client.parser import text_string_to_metric_families

from conftest import Cloud

SMALL = "resources=VCPU:1,MEMORY_MB:128"


class Api:
    """A test's HTTP client of one server, with one token."""

    def __init__(self, url: str, token: str | None) -> None:
        self.url, self.token = url, token

    def __call__(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        return requests.request(method, self.url + path, headers={**headers, **kwargs.pop("headers", {})},
                                timeout=90, **kwargs)

    def ok(self, method: str, path: str, status: int = 200, **kwargs: Any) -> Any:
        r = self(method, path, **kwargs)
        assert r.status_code == status, (r.status_code, r.text)
        return r.json() if r.content else None


def error(r: requests.Response) -> tuple[int, str, int]:
    body = r.json()["error"]
    return r.status_code, body["type"], body["exit_code"]


@pytest.fixture
def api(cloud: Cloud) -> str:
    cloud.compute("host1", stop_timeout=1)
    return cloud.api().url


def test_every_call_needs_a_live_token_and_only_its_hash_is_stored(cloud: Cloud, api: str) -> None:
    token = cloud.token("alpha")
    assert Api(api, token).ok("GET", "/v1/token")["project"] == "alpha"
    for bad in (None, "nonsense", token[:-1] + ("x" if token[-1] != "x" else "y")):
        r = Api(api, bad)("GET", "/v1/instances")
        assert error(r) == (401, "Unauthenticated", 10) and r.headers["WWW-Authenticate"] == "Bearer", bad
    assert token not in json.dumps(cloud.etcd_values())  # stored hashed
    token_id = token.split("_")[1]
    r = cloud.eschedule("token", "revoke", token_id)
    assert r.rc == 0, r
    assert Api(api, token)("GET", "/v1/token").status_code == 401  # at once
    assert cloud.eschedule("token", "revoke", token_id).rc == 6


def test_a_member_sees_and_acts_only_on_its_own_projects_instances(cloud: Cloud, api: str) -> None:
    alpha, beta = Api(api, cloud.token("alpha")), Api(api, cloud.token("beta"))
    admin = Api(api, cloud.token("ops", admin=True))
    made = alpha.ok("POST", "/v1/instances", 201, json={"query": SMALL, "wait": True})
    uuid = made["uuid"]
    assert (made["state"], made["project_id"]) == ("ACTIVE", "alpha")
    assert cloud.placement.consumer(uuid)["project_id"] == "alpha"  # Placement's consumer carries it
    assert [v["uuid"] for v in alpha.ok("GET", "/v1/instances")] == [uuid]

    # Another project: not listed, and every call on it is "no such instance", never its data.
    assert beta.ok("GET", "/v1/instances") == []
    for method, path, body in [("GET", f"/v1/instances/{uuid}", None),
                               ("GET", f"/v1/instances/{uuid}/console", None),
                               ("POST", f"/v1/instances/{uuid}/action", {"action": "stop"}),
                               ("DELETE", f"/v1/instances/{uuid}", None)]:
        r = beta(method, path, json=body)
        assert error(r) == (404, "UnknownInstance", 6), (method, path)
        assert made["host"] not in r.text
    assert error(beta("GET", "/v1/instances", params={"project": "alpha"}))[0] == 403
    assert error(beta("GET", "/v1/hosts"))[:2] == (403, "Forbidden")
    assert cloud.show(uuid)["desired"] == "active"  # nothing beta did reached the request

    # An admin sees every project (or one), and the hosts.
    assert uuid in [v["uuid"] for v in admin.ok("GET", "/v1/instances")]
    assert admin.ok("GET", "/v1/instances", params={"project": "beta"}) == []
    assert {h["uuid"]: h["state"] for h in admin.ok("GET", "/v1/hosts")}[made["host"]] == "UP"

    # The owner's lifecycle, waited, and the CLI sees the same.
    stopped = alpha.ok("POST", f"/v1/instances/{uuid}/action", json={"action": "stop", "wait": True})
    assert stopped["state"] == "STOPPED" and cloud.show(uuid)["state"] == "STOPPED"
    assert error(alpha("POST", f"/v1/instances/{uuid}/action", json={"action": "reboot"})) == (409, "InvalidState", 7)
    gone = alpha.ok("DELETE", f"/v1/instances/{uuid}", 202, params={"wait": "true"})
    assert gone["state"] == "DELETED"
    assert cloud.placement.consumer(uuid).get("allocations") == {}
    assert error(alpha("GET", f"/v1/instances/{uuid}")) == (404, "UnknownInstance", 6)


def test_the_cli_acts_for_one_project_with_project(cloud: Cloud, api: str) -> None:
    uuid = cloud.eschedule("--project", "alpha", SMALL, "--wait", "--json").json()["uuid"]
    assert cloud.show(uuid)["project_id"] == "alpha"
    assert cloud.eschedule("--project", "beta", "show", uuid).rc == 6
    assert cloud.eschedule("--project", "beta", "stop", uuid).rc == 6
    assert json.loads(cloud.eschedule("--project", "beta", "list", "--json").out) == []
    assert [v["uuid"] for v in json.loads(cloud.eschedule("--project", "alpha", "list", "--json").out)] == [uuid]
    assert cloud.eschedule("--project", "no/such", "list").rc == 2
    # What the CLI made, the project's token sees through the API.
    assert Api(api, cloud.token("alpha")).ok("GET", f"/v1/instances/{uuid}")["state"] == "ACTIVE"


@pytest.mark.parametrize(("body", "expected", "cli"), [
    ({"query": "resources=VCPU:1"}, (400, "UsageError", 2), ["resources=VCPU:1"]),
    ({"query": SMALL, "colour": "red"}, (400, "UsageError", 2), None),
    ({"query": SMALL, "image_sha256": "abc"}, (400, "UsageError", 2), [SMALL, "--image-sha256", "abc"]),
    ({"query": SMALL, "ssh_keys": ["not a key"]}, (400, "UsageError", 2), None),
    ({"query": "resources=VCPU:1000,MEMORY_MB:128"}, (409, "NoCapacity", 3), ["resources=VCPU:1000,MEMORY_MB:128"]),
])
def test_bad_schedules_fail_as_the_cli_fails(cloud: Cloud, api: str, body: dict, expected: tuple,
                                             cli: list[str] | None) -> None:
    r = Api(api, cloud.token("alpha"))("POST", "/v1/instances", json=body)
    assert error(r) == expected, r.text
    assert "\n" not in r.json()["error"]["message"]
    if cli:
        assert cloud.eschedule(*cli).rc == expected[2]
    assert cloud.instance_keys() == {}


def test_a_kernel_boot_is_asked_through_the_api_as_through_the_cli(cloud: Cloud, api: str) -> None:
    boot = {"kernel": "/srv/guest/vmlinuz", "initrd": "/srv/guest/initrd.img", "cmdline": "console=ttyS0 quiet"}
    made = Api(api, cloud.token("alpha")).ok("POST", "/v1/instances", 201, json={"query": SMALL, **boot})
    by_cli = cloud.eschedule(SMALL, "--kernel", boot["kernel"], "--initrd", boot["initrd"],
                             "--cmdline", boot["cmdline"], "--json").json()
    requests = {v["uuid"]: v for k, v in cloud.etcd_values().items() if "/requests/" in k}
    assert requests[made["uuid"]]["boot"] == requests[by_cli["uuid"]]["boot"] == boot


def test_quotas_refuse_before_claiming_and_name_the_limit(cloud: Cloud, api: str) -> None:
    alpha = Api(api, cloud.token("alpha"))
    r = cloud.eschedule("quota", "set", "alpha", "instances=1", "VCPU=2")
    assert r.rc == 0, r
    assert cloud.eschedule("quota", "set", "alpha", "vcpu=2").rc == 2
    assert error(alpha("PUT", "/v1/quotas/alpha", json={"limits": {"instances": 9}}))[:2] == (403, "Forbidden")
    alpha.ok("POST", "/v1/instances", 201, json={"query": SMALL, "wait": True})
    r = alpha("POST", "/v1/instances", json={"query": SMALL})
    assert error(r) == (403, "QuotaExceeded", 9)
    assert "instances limit 1, 1 in use" in r.json()["error"]["message"]
    assert alpha.ok("GET", "/v1/usage") == {"project": "alpha", "usage": {"instances": 1, "VCPU": 1, "MEMORY_MB": 128},
                                             "limits": {"instances": 1, "VCPU": 2}}
    r = cloud.eschedule("--project", "alpha", SMALL)
    assert r.rc == 9 and "instances limit 1" in r.err, r
    # Another project is not limited by alpha's quota; an admin raises alpha's.
    Api(api, cloud.token("beta")).ok("POST", "/v1/instances", 201, json={"query": SMALL})
    admin = Api(api, cloud.token("ops", admin=True))
    assert admin.ok("PUT", "/v1/quotas/alpha", json={"limits": {"instances": None}})["limits"] == {"VCPU": 2}
    r = alpha("POST", "/v1/instances", json={"query": "resources=VCPU:2,MEMORY_MB:128"})
    assert error(r) == (403, "QuotaExceeded", 9) and "VCPU limit 2, 1 in use, 2 more asked" in r.text
    alpha.ok("POST", "/v1/instances", 201, json={"query": SMALL})
    assert cloud.placement.project_usage("alpha")["VCPU"] == 2


def test_concurrent_schedules_near_the_limit_never_exceed_it(cloud: Cloud, api: str) -> None:
    """Eight schedules race for the last two places: each passes the check before claiming, so
    the check after claiming is what holds the line. Some may be refused although a place was
    left (a racer's claim counted for a moment); none may be placed beyond the limit."""
    cloud.compute("big", inventory={"VCPU": {"total": 64}, "MEMORY_MB": {"total": 65536}, "DISK_GB": {"total": 99}})
    alpha = Api(api, cloud.token("alpha"))  # (room for all eight but for the quota: only it may refuse)
    assert cloud.eschedule("quota", "set", "alpha", "instances=3").rc == 0
    alpha.ok("POST", "/v1/instances", 201, json={"query": SMALL})
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: alpha("POST", "/v1/instances", json={"query": SMALL}), range(8)))
    placed = [r for r in answers if r.status_code == 201]
    refused = [r for r in answers if r.status_code != 201]
    assert all(error(r) == (403, "QuotaExceeded", 9) for r in refused), [r.text for r in refused]
    assert 1 + len(placed) <= 3
    usage = cloud.placement.project_usage("alpha")
    assert usage["instances"] == 1 + len(placed)  # every refused claim was freed again
    assert len([k for k in cloud.etcd_values() if "/requests/" in k]) == usage["instances"]
    # Whatever room the race left is usable now.
    for _ in range(3 - usage["instances"]):
        alpha.ok("POST", "/v1/instances", 201, json={"query": SMALL})
    assert error(alpha("POST", "/v1/instances", json={"query": SMALL}))[0] == 403


def test_the_openapi_document_is_valid_and_describes_every_route(cloud: Cloud, api: str) -> None:
    doc = requests.get(api + "/v1/openapi.json", timeout=10).json()
    validate(doc)  # against the OpenAPI 3.1 schema
    paths = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    assert {("/v1/instances", "get"), ("/v1/instances", "post"), ("/v1/instances/{uuid}", "get"),
            ("/v1/instances/{uuid}", "delete"), ("/v1/instances/{uuid}/action", "post"),
            ("/v1/instances/{uuid}/console", "get"), ("/v1/hosts", "get"), ("/v1/usage", "get"),
            ("/v1/quotas/{name}", "put"), ("/v1/token", "get")} <= paths
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert {"401", "404", "503"} <= set(op["responses"]), (path, method)
    r = requests.delete(api + "/v1/instances", timeout=10)
    assert (r.status_code, r.json()["error"]["exit_code"]) == (405, 2)  # the API's error body, always
    assert set(doc["components"]["schemas"]["View"]["properties"]) >= {"uuid", "state", "ip", "host", "project_id"}
    assert doc["components"]["schemas"]["ActionBody"]["properties"]["action"]


def test_api_metrics_count_requests_and_schedules(cloud: Cloud, api: str) -> None:
    alpha = Api(api, cloud.token("alpha"))

    def scrape() -> dict[tuple[str, tuple], float]:
        text = requests.get(api + "/metrics", timeout=10).text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    before = scrape()
    alpha.ok("POST", "/v1/instances", 201, json={"query": SMALL})
    alpha("POST", "/v1/instances", json={"query": "resources=VCPU:1000,MEMORY_MB:1"})
    after = scrape()
    placed = ("etcd_compute_api_schedules_total", (("result", "placed"),))
    refused = ("etcd_compute_api_schedules_total", (("result", "NoCapacity"),))
    assert after[placed] - before.get(placed, 0) == 1 and after[refused] - before.get(refused, 0) == 1
    count = ("etcd_compute_api_request_duration_seconds_count",
             (("method", "POST"), ("route", "/v1/instances"), ("status", "201")))
    assert after[count] - before.get(count, 0) == 1


# ---------------------------------------------------------------- issue 22: by name, and as documented

def test_the_api_takes_names_flavors_images_and_groups(cloud: Cloud, api: str) -> None:
    alpha, beta = Api(api, cloud.token("alpha")), Api(api, cloud.token("beta"))
    admin = Api(api, cloud.token("ops", admin=True))
    assert error(alpha("POST", "/v1/flavors", json={"name": "small", "resources": {"VCPU": 1, "MEMORY_MB": 128}})
                 )[:2] == (403, "Forbidden")
    admin.ok("POST", "/v1/flavors", 201, json={"name": "small", "resources": {"VCPU": 1, "MEMORY_MB": 128}})
    assert [f["name"] for f in alpha.ok("GET", "/v1/flavors")] == ["small"]
    alpha.ok("POST", "/v1/groups", 201, json={"name": "web", "policy": "anti-affinity"})
    assert beta.ok("GET", "/v1/groups") == []
    made = alpha.ok("POST", "/v1/instances", 201, json={"flavor": "small", "name": "web1", "group": "web",
                                                        "wait": True})
    assert (made["name"], made["flavor"], made["group"], made["state"]) == ("web1", "small", "web", "ACTIVE")
    host = cloud.compute_config("host1")["name"]
    assert [v["name"] for v in alpha.ok("GET", "/v1/instances", params={"host": host})] == ["web1"]
    assert error(alpha("GET", "/v1/instances", params={"host": "no-such-host"}))[:2] == (404, "UnknownInstance")
    for ref in ("web1", made["uuid"][:8]):
        assert alpha.ok("GET", f"/v1/instances/{ref}")["uuid"] == made["uuid"]
    assert error(beta("GET", "/v1/instances/web1")) == (404, "UnknownInstance", 6)  # its own project's names only
    assert alpha.ok("POST", "/v1/instances/web1/action", json={"action": "stop", "wait": True})["state"] == "STOPPED"
    r = alpha("POST", "/v1/instances", json={"flavor": "small", "name": "web1"})
    assert error(r) == (400, "UsageError", 2) and "is taken" in r.json()["error"]["message"]
    r = alpha("POST", "/v1/instances", json={"flavor": "small", "group": "web"})  # one host, and web1 is on it
    assert error(r) == (409, "NoCapacity", 3) and "anti-affinity group web" in r.json()["error"]["message"]
    assert alpha.ok("GET", "/v1/groups/web")["size"] == 1
    assert alpha.ok("DELETE", "/v1/instances/web1", 202, params={"wait": "true"})["state"] == "DELETED"
    alpha.ok("DELETE", "/v1/groups/web")
    assert alpha.ok("GET", "/v1/images") == []


def test_quotas_are_readable_consoles_empty_are_204_and_bad_bodies_are_json_errors(cloud: Cloud, api: str) -> None:
    alpha = Api(api, cloud.token("alpha"))
    admin = Api(api, cloud.token("ops", admin=True))
    assert cloud.eschedule("quota", "set", "alpha", "instances=3").rc == 0
    assert alpha.ok("GET", "/v1/quotas/alpha")["limits"] == {"instances": 3}  # was 405
    assert error(alpha("GET", "/v1/quotas/beta"))[:2] == (403, "Forbidden")
    assert admin.ok("GET", "/v1/quotas/alpha")["project"] == "alpha"
    made = alpha.ok("POST", "/v1/instances", 201, json={"query": SMALL, "name": "quiet"})
    cloud.store.client.put(f"{cloud.prefix}/consoles/{made['uuid']}", json.dumps(
        {"uuid": made["uuid"], "host": made["host"], "offset": 0, "text": "", "updated_at": "x"}))
    r = alpha("GET", "/v1/instances/quiet/console")
    assert (r.status_code, r.content) == (204, b"")  # published, but nothing in it yet
    for body, headers, said in [
            (b"{not json", {"content-type": "application/json"}, "the body is not JSON"),
            (b"", {"content-type": "application/json"}, "the body"),
            (b"[1, 2]", {"content-type": "application/json"}, "the body must be a JSON object"),
            (b"query=x", {"content-type": "application/x-www-form-urlencoded"}, "the body"),
            (b'{"query": 5}', {"content-type": "application/json"}, "query: ")]:
        r = alpha("POST", "/v1/instances", data=body, headers=headers)
        assert error(r) == (400, "UsageError", 2), (body, r.text)
        message = r.json()["error"]["message"]
        assert said in message and "\n" not in message and not message.startswith("0:"), (body, message)


def test_the_openapi_document_says_how_to_authenticate_and_what_is_sent(cloud: Cloud, api: str) -> None:
    doc = requests.get(api + "/v1/openapi.json", timeout=10).json()
    validate(doc)
    assert doc["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer", "bearerFormat": "ect_<id>_<secret>",
        "description": "A token from `eschedule token create PROJECT [--admin]`"}
    assert doc["security"] == [{"bearer": []}]
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert "422" not in op["responses"], (path, method)  # never sent: bad input is 400
            assert op["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorBody")
    view = doc["components"]["schemas"]["View"]["properties"]
    assert view["state"]["enum"] == ["PENDING", "BUILDING", "ACTIVE", "STOPPED", "SUSPENDED", "ERROR", "CRASHED",
                                     "DELETING"]
    assert ["active", "stopped", "suspended", "deleted"] in [b.get("enum") for b in view["desired"]["anyOf"]]
    action = doc["components"]["schemas"]["ActionBody"]["properties"]["action"]
    assert doc["components"]["schemas"][action["$ref"].rsplit("/", 1)[1]]["enum"] == [
        "start", "stop", "suspend", "resume", "reboot"]
    assert ("/v1/quotas/{name}", "get") in {(p, m) for p, ops in doc["paths"].items() for m in ops}


def test_a_stop_says_how_the_guest_goes_down(cloud: Cloud, api: str) -> None:
    """`stop_timeout` and `force` of an action reach the request (the host acts on them); on
    other actions, out of range or together they are refused as the CLI refuses them."""
    alpha = Api(api, cloud.token("alpha"))
    uuid = alpha.ok("POST", "/v1/instances", 201, json={"query": SMALL, "wait": True})["uuid"]
    for body, status in [({"action": "start", "force": True}, 400), ({"action": "stop", "stop_timeout": 0}, 400),
                         ({"action": "stop", "stop_timeout": 5, "force": True}, 400)]:
        assert alpha("POST", f"/v1/instances/{uuid}/action", json=body).status_code == status, body
    shown = alpha.ok("POST", f"/v1/instances/{uuid}/action", json={"action": "stop", "stop_timeout": 2.5,
                                                                     "wait": True})
    assert shown["state"] == "STOPPED"
    request = next(v for k, v in cloud.etcd_values().items() if "/requests/" in k)
    assert request["shutdown"] == {"timeout": 2.5, "force": False}
    events = [e["event"] for e in shown["events"]]  # (test:///default ignores ACPI)
    assert events[-1] == "STOPPED: did not finish shutting down within 2.5 s; powered off", events
    alpha.ok("POST", f"/v1/instances/{uuid}/action", json={"action": "start", "wait": True})
    shown = alpha.ok("POST", f"/v1/instances/{uuid}/action", json={"action": "stop", "force": True, "wait": True})
    assert [e["event"] for e in shown["events"]][-1] == "STOPPED: powered off at once (--force): no clean shutdown"

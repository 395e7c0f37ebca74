"""docker/'s containers, built and run for real with podman (devstack/containers.py).

Both images are built from a Debian base imported offline, the compose file is brought up as it is
(only ports and base images come from the environment), and a real ecompute (test:///default) and
eschedule work against the containers: schedule, show, destroy. Placement's and etcd's data outlive
their containers (their volumes); the `shared` profile (two Placement replicas on PostgreSQL behind
HAProxy) holds under racing schedulers; the Kubernetes manifests run under `podman kube play`; the
gabbi smoke tests pass against the stack's Placement and the containers'; Docker's compose reads
the file as podman-compose does. Everything is named ectest... in podman's storage of this stack
(<stack>/containers, nobody else's) and removed afterwards.
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import secrets
import statistics
import subprocess
import time
import uuid as uuidlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from devstack import containers, harness, localstack
from devstack.harness import BIN, free_port, wait_until
from etcd_compute.config import EtcdConfig, PlacementConfig, ScheduleConfig
from etcd_compute.errors import NoCapacity
from etcd_compute.eschedule.operations import Operations
from etcd_compute.placement import PlacementClient
from etcd_compute.store import Store

from conftest import Cloud

pytestmark = pytest.mark.containers

PREFIX = "ectest"
SMALL = "resources=VCPU:1,MEMORY_MB:128,DISK_GB:1"
KUBE = containers.DOCKER / "k8s"
TEN_VCPUS = {**harness.INVENTORY, "VCPU": {"total": 10, "allocation_ratio": 1.0}}


@dataclass
class Engine:
    project: containers.Project
    etcd: str
    placement: str
    shared: str  # the shared profile's address (HAProxy), once it is up
    base: str


def placement_up(url: str) -> bool:
    return localstack.http_ok(url + "/", {"x-auth-token": "admin"})


def ip_of(container: str) -> str:
    """A container's address on its (first) network: rootful podman routes its bridges from the host."""
    fmt = "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}"
    return containers.podman("inspect", "--format", fmt, container).stdout.split()[0]


def kube_pods() -> list[str]:
    """The pods the manifests' Deployment makes: placement-pod-0, -1, ... (one per replica)."""
    return sorted(n for n in containers.podman("pod", "ps", "--format", "{{.Name}}").stdout.split()
                  if n.startswith("placement-pod-"))


def kube_down() -> None:
    """Tear down what the manifests make (their names are theirs, not ours: one user at a time, locked).
    `podman kube down` (4.3) takes away the first replica's pod only: the others go by name."""
    for manifest in ("placement.yaml", "placement-shared.yaml"):
        containers.podman("kube", "down", str(KUBE / manifest), check=False)
    if kube_pods():
        containers.podman("pod", "rm", "-f", *kube_pods(), check=False)
    containers.podman("volume", "rm", "-f", "placement-data", check=False)
    containers.podman("secret", "rm", "placement-db", check=False)


@pytest.fixture(scope="module")
def engine(stack: dict) -> Iterator[Engine]:
    """Base image, images built (or found cached), the compose file's default services up on free
    loopback ports; everything of the project removed at the end, whatever happened."""
    with containers.locked():
        containers.remove_stale(PREFIX)
        kube_down()
        t0 = time.monotonic()
        base = containers.ensure_base()
        ports = {k: free_port() for k in ("ETCD_PORT", "PLACEMENT_PORT", "PLACEMENT_SHARED_PORT")}
        project = containers.Project(f"{PREFIX}{uuidlib.uuid4().hex[:6]}", BIN, {
            "DEBIAN_IMAGE": base, "PYTHON_IMAGE": base, "BIND_ADDRESS": "127.0.0.1",
            "POSTGRES_PASSWORD": secrets.token_hex(8), **{k: str(v) for k, v in ports.items()}})
        base_s = time.monotonic() - t0
        try:
            built = project.build()
            sizes = containers.image_sizes([f"etcd-compute/{n}:latest" for n in ("etcd", "placement", "postgres",
                                                                                    "haproxy")] + [base])
            print(f"\ncontainers: base image {base_s:.1f} s; builds (s) "
                  + ", ".join(f"{n} {s:.1f}" for n, s in built.items()) + "; sizes (MB) "
                  + ", ".join(f"{n.split('/')[-1]} {s / 1e6:.0f}" for n, s in sizes.items()))
            t0 = time.monotonic()
            project.compose("up", "-d", "--no-build")
            e = Engine(project, f"http://127.0.0.1:{ports['ETCD_PORT']}", f"http://127.0.0.1:{ports['PLACEMENT_PORT']}",
                       f"http://127.0.0.1:{ports['PLACEMENT_SHARED_PORT']}", base)
            wait_until(lambda: localstack.http_ok(e.etcd + "/health", needle='"true"'), 60, "etcd in its container")
            wait_until(lambda: placement_up(e.placement), 90, "Placement in its container")
            print(f"containers: etcd and Placement up in {time.monotonic() - t0:.1f} s")
            yield e
        finally:
            kube_down()
            project.remove()
            left = [*project.labelled("container"), *project.labelled("volume"), *project.labelled("network"),
                    *kube_pods()]
            assert not left, f"left behind: {left}"


@pytest.fixture(scope="module")
def shared(engine: Engine) -> Engine:
    """The `shared` profile up: PostgreSQL, two Placement replicas, HAProxy in front; both replicas
    answering (each at its own address) before the balancer's is used."""
    t0 = time.monotonic()
    engine.project.compose("up", "-d", "--no-build", "placement-lb", profile="shared")
    for i in (1, 2):
        replica = engine.project.container("placement-replica", i)
        wait_until(lambda r=replica: placement_up(f"http://{ip_of(r)}:8778"), 120, f"{replica} to answer")
    wait_until(lambda: placement_up(engine.shared), 60, "Placement behind HAProxy")
    print(f"\ncontainers: shared profile up in {time.monotonic() - t0:.1f} s")
    return engine


def operations(cloud: Cloud, placement_timeout: float = 10.0) -> Operations:
    """A scheduler of the cloud's, as its schedule.yaml says: its etcd prefix, its Placement, no image."""
    cfg = ScheduleConfig(etcd=EtcdConfig(endpoints=[cloud.stack["etcd"]], prefix=cloud.prefix), default_image=None)
    cfg.placement.endpoint, cfg.placement.timeout = cloud.stack["placement"], placement_timeout
    return Operations(cfg)


def schedule_ms(cloud: Cloud, n: int) -> list[float]:
    """The time of `n` schedules (candidates, claim, the request in etcd), one after another, in ms."""
    ops = operations(cloud)
    try:
        ops.schedule(SMALL)  # connections made, imports done
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            ops.schedule(SMALL)
            times.append((time.perf_counter() - t0) * 1000)
        return times
    finally:
        ops.close()


def figures(times: list[float]) -> str:
    return f"{min(times):.0f}/{statistics.median(times):.0f}/{max(times):.0f}"


def test_ecompute_and_eschedule_run_on_the_containers(engine: Engine, stack: dict, tmp_path: Path) -> None:
    for d in ("c", "l"):
        (tmp_path / d).mkdir()
    cloud = Cloud({**stack, "etcd": engine.etcd, "placement": engine.placement}, tmp_path / "c")
    local = Cloud(stack, tmp_path / "l")
    try:
        host = cloud.compute("host1")
        view = cloud.boot(SMALL)
        uuid = view["uuid"]
        assert view["host"] == host.host
        # In the containers' etcd and Placement; the stack's Placement never saw the claim.
        assert any(k.endswith(uuid) for k in cloud.instance_keys() if "/requests/" in k)
        assert set(cloud.placement.get_allocations(uuid)) == {host.host}
        assert local.placement.get_allocations(uuid) == {}
        shown = cloud.show(uuid)
        assert (shown["state"], shown["host"]) == ("ACTIVE", host.host)
        r = cloud.eschedule("destroy", uuid, "--wait")
        assert r.rc == 0, r
        assert cloud.instance_keys() == {}
        assert cloud.placement.get_allocations(uuid) == {}
        assert cloud.usages(host.host)["VCPU"] == 0

        local.compute("host1", inventory=TEN_VCPUS)
        cloud.computes[0].stop()
        cloud.compute("host2", inventory=TEN_VCPUS)
        through = {"containers": schedule_ms(cloud, 6), "devstack": schedule_ms(local, 6)}
        print("\nschedule latency, ms min/median/max: " + ", ".join(f"{k} {figures(v)}" for k, v in through.items()))
        for name in ("etcd", "placement"):
            c = engine.project.container(name)
            assert containers.podman("healthcheck", "run", c, check=False).returncode == 0, f"{c} unhealthy"
            assert containers.podman("exec", c, "id", "-u").stdout.strip() != "0", f"{c} runs as root"
    finally:
        cloud.cleanup()
        local.cleanup()


def test_placement_and_etcd_data_outlive_their_containers(engine: Engine) -> None:
    """The containers are removed and made anew from the images: what was written is read back from
    the volumes (a provider, its inventory, an allocation; a key in etcd)."""
    rp, consumer, key = str(uuidlib.uuid4()), str(uuidlib.uuid4()), f"/{PREFIX}-keep/{uuidlib.uuid4().hex}"
    placement = PlacementClient(PlacementConfig(endpoint=engine.placement))
    placement.ensure_provider(rp, f"{PREFIX}-keep-{rp[:8]}")
    placement.set_inventories(rp, {"VCPU": {"total": 7}})
    placement.claim(consumer, {rp: {"resources": {"VCPU": 3}}}, "p", "u")
    store = Store(EtcdConfig(endpoints=[engine.etcd], prefix=""))
    store.client.put(key, "kept")
    store.close()
    names = [engine.project.container(s) for s in ("etcd", "placement")]
    before = {n: containers.podman("inspect", "--format", "{{.Id}}", n).stdout.strip() for n in names}
    containers.podman("rm", "-f", "-t", "5", *names)
    engine.project.compose("up", "-d", "--no-build", "etcd", "placement")
    wait_until(lambda: localstack.http_ok(engine.etcd + "/health", needle='"true"'), 60, "etcd again")
    wait_until(lambda: placement_up(engine.placement), 90, "Placement again")
    after = {n: containers.podman("inspect", "--format", "{{.Id}}", n).stdout.strip() for n in names}
    assert all(after[n] != before[n] for n in names)  # new containers, the same volumes
    placement = PlacementClient(PlacementConfig(endpoint=engine.placement))
    assert placement.inventories(rp)["VCPU"]["total"] == 7
    assert placement.get_allocations(consumer) == {rp: {"resources": {"VCPU": 3}, "generation": 2}}
    store = Store(EtcdConfig(endpoints=[engine.etcd], prefix=""))
    try:
        assert store.client.get(key)[0] == b"kept"
        store.client.delete(key)
    finally:
        store.close()
    placement.delete_allocations(consumer)
    placement.delete_provider(rp)


def normalized(config: dict, profile: str | None) -> dict[str, Any]:
    """What a compose implementation resolved each service of `profile` to, in one notation for both
    (podman-compose writes build args as a list and leaves `/tcp` and `:rw` implicit, docker-compose
    spells them out; docker-compose's `config` lists the services of every profile)."""
    def args(build: dict) -> dict[str, str]:
        raw = build.get("args", {})
        return dict(a.split("=", 1) for a in raw) if isinstance(raw, list) else dict(raw)

    def replicas(service: dict) -> int:
        return int(service.get("deploy", {}).get("replicas", 1))

    return {name: {"image": s.get("image"), "context": Path(s["build"]["context"]).resolve(),
                   "args": args(s["build"]), "ports": sorted(str(p).removesuffix("/tcp") for p in s.get("ports", [])),
                   "volumes": sorted(str(v).removesuffix(":rw") for v in s.get("volumes", [])),
                   "environment": dict(s.get("environment") or {}), "replicas": replicas(s),
                   "depends_on": sorted(s.get("depends_on") or [])}
            for name, s in config["services"].items() if set(s.get("profiles", [profile])) & {profile}}


def test_docker_compose_reads_the_file_as_podman_compose_does(engine: Engine) -> None:
    """The file the other tests ran, unchanged: Docker's compose (Debian's docker-compose, which
    validates it against the Compose specification's schema) resolves every service of each profile
    to the same image, build, ports, volumes, environment, replicas and dependencies."""
    for profile in (None, "shared"):
        ours = yaml.safe_load(engine.project.compose("config", profile=profile).stdout)
        docker = subprocess.run(["docker-compose", "-f", str(containers.COMPOSE_FILE), "-p", engine.project.name,
                                 *(["--profile", profile] if profile else []), "config"],
                                capture_output=True, text=True, env=engine.project.env, timeout=60)
        assert docker.returncode == 0, docker.stderr
        theirs = yaml.safe_load(docker.stdout)
        wanted = {"etcd", "placement"} | ({"db", "placement-replica", "placement-lb"} if profile else set())
        assert set(normalized(ours, profile)) == wanted
        assert normalized(theirs, profile) == normalized(ours, profile)


def test_shared_profile_replicas_behind_one_address_never_overcommit(shared: Engine, stack: dict,
                                                                     tmp_path: Path) -> None:
    """Twenty-four schedulers, each with its own connections, race for sixteen slots on two hosts
    through HAProxy: sixteen placed and eight refused, each host exactly at its capacity in Placement
    and in etcd, all sixteen built, both replicas served claims, and the allocations are in PostgreSQL."""
    project = shared.project
    cloud = Cloud({**stack, "etcd": shared.etcd, "placement": shared.shared}, tmp_path)
    replicas = [project.container("placement-replica", i) for i in (1, 2)]
    # The race is about capacity, not speed: on two cores shared with guests, 24 claims can queue
    # behind the replicas' four workers for longer than a scheduler's default 10 s.
    schedulers = [operations(cloud, placement_timeout=120) for _ in range(24)]
    try:
        hosts = [cloud.compute(f"h{i}").host for i in range(2)]  # harness.INVENTORY: 8 VCPUs each
        for s in schedulers:
            _ = s.store, s.placement  # connected before the race

        def schedule(s: Operations) -> dict | Exception:
            try:
                return s.schedule(SMALL)
            except Exception as exc:  # noqa: BLE001 - a refusal is an outcome the test counts
                return exc

        with concurrent.futures.ThreadPoolExecutor(len(schedulers)) as pool:
            results = list(pool.map(schedule, schedulers))
        placed = [r for r in results if isinstance(r, dict)]
        assert len(placed) == 16 and all(isinstance(r, NoCapacity) for r in results if r not in placed), results
        assert Counter(r["host"] for r in placed) == dict.fromkeys(hosts, 8)
        for h in hosts:
            assert cloud.usages(h)["VCPU"] == 8 and len(cloud.placement.provider_allocations(h)) == 8
        assert {k.rsplit("/", 1)[1] for k in cloud.etcd_values() if "/requests/" in k} == {r["uuid"] for r in placed}
        wait_until(lambda: Counter(v["state"] for v in cloud.eschedule("list", "--json").json()) == {"ACTIVE": 16},
                   60, "all sixteen ACTIVE")
        assert [cloud.usages(h)["VCPU"] for h in hosts] == [8, 8]
        for r in replicas:
            log = containers.podman("logs", r).stdout + containers.podman("logs", r).stderr
            assert "PUT /allocations/" in log, f"{r} served no claim"
            assert harness.OVERAGE_LOGGED not in log
        in_db = containers.podman("exec", project.container("db"), "psql", "-U", "placement", "-tAc",
                                  "SELECT count(DISTINCT a.consumer_id) FROM allocations a JOIN resource_providers p"
                                  f" ON p.id = a.resource_provider_id WHERE p.uuid IN ('{hosts[0]}', '{hosts[1]}')")
        assert in_db.stdout.strip() == "16"
        for c in [project.container("db"), *replicas, project.container("placement-lb")]:
            assert containers.podman("healthcheck", "run", c, check=False).returncode == 0, f"{c} unhealthy"
            assert containers.podman("exec", c, "id", "-u").stdout.strip() != "0", f"{c} runs as root"
    finally:
        for s in schedulers:
            s.close()
        cloud.cleanup()


def test_kubernetes_manifests_play_and_pass_the_smoke_tests(shared: Engine) -> None:
    """placement.yaml (one pod, SQLite in its claim's volume) and placement-shared.yaml (two pods on
    its Secret's database: here the compose file's PostgreSQL) run under `podman kube play`, unchanged,
    and pass the smoke tests at each pod's address; the shared pods see what HAProxy's replicas wrote."""
    network = f"{shared.project.name}-kube"
    containers.podman("network", "create", network)
    try:
        containers.podman("kube", "play", "--network", network, str(KUBE / "placement.yaml"))
        assert kube_pods() == ["placement-pod-0"]
        pod = f"http://{ip_of('placement-pod-0-placement')}:8778"
        wait_until(lambda: placement_up(pod), 90, "the standalone pod")
        assert containers.smoke(pod, BIN) == 0
        assert containers.podman("exec", "placement-pod-0-placement", "id", "-u").stdout.strip() == "42482"
        kube_down()

        # The Secret the manifest names, as podman 4.3 reads one: a podman secret holding its `data`
        # (JSON, values in base64); the database is the compose file's, found by its service name.
        password = shared.project.env["POSTGRES_PASSWORD"]
        url = f"postgresql+psycopg2://placement:{password}@db/placement"
        containers.podman("secret", "create", "placement-db", "-",
                          input_text=json.dumps({"connection": base64.b64encode(url.encode()).decode()}))
        manifest = KUBE / "placement-shared.yaml"
        containers.podman("kube", "play", "--network", f"{shared.project.name}_default", str(manifest))
        assert kube_pods() == ["placement-pod-0", "placement-pod-1"]  # its two replicas
        pods = [f"http://{ip_of(f'{name}-placement')}:8778" for name in kube_pods()]
        for pod in pods:
            wait_until(lambda p=pod: placement_up(p), 90, f"the shared-database pod at {pod}")
        rp = str(uuidlib.uuid4())
        behind_lb = PlacementClient(PlacementConfig(endpoint=shared.shared))
        behind_lb.ensure_provider(rp, f"{PREFIX}-seen-{rp[:8]}")
        try:
            assert all(PlacementClient(PlacementConfig(endpoint=pod)).provider(rp) is not None for pod in pods)
        finally:
            behind_lb.delete_provider(rp)
        for pod in pods:
            assert containers.smoke(pod, BIN) == 0
    finally:
        kube_down()
        containers.podman("network", "rm", "-f", network, check=False)


def test_smoke_tests_pass_against_the_stacks_placement_and_the_containers(engine: Engine, stack: dict) -> None:
    for url in (stack["placement"], engine.placement):
        assert containers.smoke(url, BIN) == 0, url

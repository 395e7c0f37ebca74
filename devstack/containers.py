"""The container stack of docker/ on this machine: podman, a Debian base made offline, compose projects.

No registry is reachable here, and the machine's podman defaults do not run (crun refuses the
hybrid cgroups, systemd is not PID 1, its ulimits exceed the machine's hard limits). So podman
runs with a configuration of ours under <stack>/containers (runc, cgroupfs, ulimits within the
hard limits, netavark) and keeps its images, containers, volumes and networks there too, apart
from anything else on the machine; the base image is a Debian 12 minbase made by debootstrap
and imported (cached by its recipe), on which the compose file builds every image. Standard
library only, like localstack, which calls smoke() for `python3 -m devstack smoke`.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import resource
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from devstack import localstack, testguest

DOCKER = localstack.REPO / "docker"
COMPOSE_FILE = DOCKER / "docker-compose.yml"
SMOKE_FILE = DOCKER / "gabbi" / "placement-smoke.yaml"
BASE_NAME = "localhost/etcd-compute/debian"
BASE_SUITE = "bookworm"
# What makes the debootstrap root file system a base like the registry's debian:bookworm-slim: no
# daemon starts in a build, no documentation or package lists are kept, updates and security fixes
# come from the mirror (MIRROR is replaced by it).
BASE_FILES = {
    "usr/sbin/policy-rc.d": "#!/bin/sh\n# No daemon starts inside an image.\nexit 101\n",
    "etc/apt/sources.list": f"deb MIRROR {BASE_SUITE} main\ndeb MIRROR {BASE_SUITE}-updates main\n"
                            f"deb MIRROR-security {BASE_SUITE}-security main\n",
    "etc/apt/apt.conf.d/docker-clean": 'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb '
                                       '/var/cache/apt/*.bin || true"; };\nDir::Cache::pkgcache "";\n'
                                       'Dir::Cache::srcpkgcache "";\nAcquire::Languages "none";\n',
    "etc/dpkg/dpkg.cfg.d/docker-excludes": "".join(f"path-exclude /usr/share/{d}/*\n" for d in (
        "doc", "man", "info", "locale", "groff", "lintian")) + "path-include /usr/share/doc/*/copyright\n",
}
BASE_REMOVE = ["var/lib/apt/lists/*", "var/cache/apt/*.bin", "var/cache/apt/archives/*.deb", "usr/share/doc/*",
               "usr/share/man/*", "usr/share/info/*", "usr/share/locale/*", "var/log/*.log", "etc/hostname",
               "etc/resolv.conf", "etc/machine-id"]
# The build stage of each service the compose file builds (placement-replica shares placement's image).
BUILT = ("etcd", "placement", "db", "placement-lb")
CA_IN_BUILD = "/run/ca-bundle.crt"  # docker/placement/Dockerfile's CA_BUNDLE


def home() -> Path:
    """<stack>/containers: podman's configuration, storage and the base image's package cache."""
    return localstack.stack_dir() / "containers"


def _limit(kind: int, most: int) -> int:
    hard = resource.getrlimit(kind)[1]
    return most if hard == resource.RLIM_INFINITY else min(hard, most)


def podman_env() -> dict[str, str]:
    """The environment for podman and podman-compose: our containers.conf and storage.conf.

    Images are written in Docker's format (BUILDAH_FORMAT): OCI images have no HEALTHCHECK.
    Health checks run only on demand (`podman healthcheck run`): their timers need systemd.
    """
    d = home()
    nofile, nproc = _limit(resource.RLIMIT_NOFILE, 4096), _limit(resource.RLIMIT_NPROC, 4096)
    run = Path("/run") / f"etcd-compute-{hashlib.sha256(str(d).encode()).hexdigest()[:8]}"
    files = {
        "containers.conf": f"""\
[containers]
default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]
log_driver = "k8s-file"
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
tmp_dir = "{run}/libpod"
[network]
network_backend = "netavark"
network_config_dir = "{d}/networks"
""",
        "storage.conf": f'[storage]\ndriver = "overlay"\ngraphroot = "{d}/storage"\nrunroot = "{run}/storage"\n',
    }
    d.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        if not (d / name).exists() or (d / name).read_text() != text:
            (d / name).write_text(text)
    return {**os.environ, "CONTAINERS_CONF": str(d / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(d / "storage.conf"), "BUILDAH_FORMAT": "docker"}


def podman(*args: str, check: bool = True, timeout: float = 300,
           input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run podman with our configuration (`input_text` on its stdin); raise with its stderr when `check`
    and it fails."""
    p = subprocess.run(["podman", *args], capture_output=True, text=True, env=podman_env(), timeout=timeout,
                       input=input_text, stdin=None if input_text is not None else subprocess.DEVNULL)
    if check and p.returncode:
        raise localstack.StackError(f"podman {' '.join(args)} failed ({p.returncode}): {p.stderr.strip()[-1500:]}")
    return p


@contextmanager
def locked() -> Iterator[None]:
    """One user of the container stack at a time (the base build, a test module): they share names."""
    home().mkdir(parents=True, exist_ok=True)
    with (home() / "lock").open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


# ---------------------------------------------------------------- the base image

# What `podman import` adds (an imported file system has no environment): as in Debian's images.
BASE_CHANGES = ["ENV=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", 'CMD ["bash"]']


def base_recipe() -> str:
    recipe = [BASE_SUITE, "minbase", BASE_FILES, BASE_REMOVE, BASE_CHANGES]
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def ensure_base() -> str:
    """The Debian 12 base image (name:tag), imported from a debootstrap root file system unless this
    recipe's is there already: ~40 s once (the packages are cached in <home>/debs), then nothing."""
    image = f"{BASE_NAME}:{BASE_SUITE}-{base_recipe()}"
    if podman("image", "exists", image, check=False).returncode == 0:
        return image
    mirror = os.environ.get("ECOMPUTE_DEBIAN_MIRROR") or testguest.CLOUD_MIRROR
    (home() / "debs").mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="base-", dir=home()))
    root, log = work / "root", home() / "base-build.log"
    t0 = time.monotonic()
    localstack.say(f"containers: debootstrap {BASE_SUITE} for the base image {image}")
    try:
        localstack.run_logged(["debootstrap", "--variant=minbase", f"--cache-dir={home() / 'debs'}", BASE_SUITE,
                               root, mirror], log, "debootstrap of the base image", testguest.build_env())
        for pattern in BASE_REMOVE:
            for path in root.glob(pattern):
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        for rel, text in BASE_FILES.items():
            (root / rel).write_text(text.replace("MIRROR", mirror))
            os.chmod(root / rel, 0o755 if rel.endswith("policy-rc.d") else 0o644)
        with subprocess.Popen(["tar", "-C", str(root), "--numeric-owner", "-c", "."],
                              stdout=subprocess.PIPE) as tar:
            changes = [a for change in BASE_CHANGES for a in ("--change", change)]
            imported = subprocess.run(["podman", "import", *changes, "-", image], stdin=tar.stdout,
                                      capture_output=True, text=True, env=podman_env())
        if tar.returncode or imported.returncode:
            raise localstack.StackError(f"importing {root}: tar {tar.returncode}, podman {imported.stderr[-800:]}")
    finally:
        testguest.remove_tree(work)
    for old in podman("images", "--format", "{{.Repository}}:{{.Tag}}", BASE_NAME).stdout.split():
        if old != image:
            podman("rmi", old, check=False)
    localstack.say(f"containers: base image {image} in {time.monotonic() - t0:.0f} s")
    return image


def host_ca_bundle() -> Path | None:
    """The CA bundle this machine trusts (a TLS-inspecting proxy's CA included), for pip in a build."""
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile):
        if candidate and Path(candidate).is_file():
            return Path(candidate).resolve()
    return None


# ---------------------------------------------------------------- compose projects

class Project:
    """A compose project of docker/docker-compose.yml under a name of its own (its containers,
    networks and volumes are named after it), run with podman-compose from `bin`.

    The file is used as it is: only the environment (base images, loopback ports) and command-line
    options differ from what a docker compose user runs.
    """

    def __init__(self, name: str, bin: Path, env: dict[str, str]) -> None:
        self.name, self.bin = name, bin
        self.env = {**podman_env(), **env}

    def compose(self, *args: str, profile: str | None = None, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        # No pod per project: docker compose has none, and the services share nothing but the network.
        cmd = [str(self.bin / "podman-compose"), "--in-pod=false", "-f", str(COMPOSE_FILE), "-p", self.name,
               *(["--profile", profile] if profile else []), *args]
        p = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=timeout, stdin=subprocess.DEVNULL)
        if p.returncode:
            raise localstack.StackError(f"{' '.join(cmd[1:])} failed ({p.returncode}):\n{p.stdout[-2000:]}\n"
                                        f"{p.stderr[-2000:]}")
        return p

    def build(self) -> dict[str, float]:
        """Build (or find in the layer cache) every image the file builds; the seconds each took.

        The host's CA bundle is mounted into each build (not kept in an image): pip must trust
        whatever proxy stands between this machine and PyPI.
        """
        ca = host_ca_bundle()
        extra = [f"--podman-build-args=--volume={ca}:{CA_IN_BUILD}:ro"] if ca else []
        took = {}
        # One service at a time: placement's pip install is the slow step, and two cores are shared.
        for service in BUILT:
            t0 = time.monotonic()
            self.compose(*extra, "build", *(["--build-arg", f"CA_BUNDLE={CA_IN_BUILD}"] if ca else []), service,
                         profile="shared")
            took[service] = time.monotonic() - t0
        podman("image", "prune", "-f")  # the images these builds replaced
        return took

    def container(self, service: str, index: int = 1) -> str:
        return f"{self.name}_{service}_{index}"

    def labelled(self, kind: str) -> list[str]:
        """The names (ids for containers) of this project's `kind`s: container, volume, network."""
        fmt = "{{.ID}}" if kind == "container" else "{{.Name}}"
        args = [kind, "ls", "-a"] if kind == "container" else [kind, "ls"]
        out = podman(*args, "--filter", f"label=io.podman.compose.project={self.name}", "--format", fmt,
                     check=False).stdout
        return out.split()

    def remove(self) -> None:
        """Everything of this project: its containers (with their anonymous volumes and whatever depends
        on them: a replica on its database), volumes, network."""
        for _ in range(3):  # a container removed with one it depends on is gone when its own turn comes
            found = self.labelled("container")
            if not found:
                break
            podman("rm", "-f", "-v", "--depend", "-t", "5", *found, check=False, timeout=120)
        for kind in ("volume", "network"):
            names = self.labelled(kind)
            if names:
                podman(kind, "rm", "-f", *names, check=False)


def remove_stale(prefix: str) -> None:
    """What killed runs left: pods, containers, volumes, networks and secrets named `prefix`... (or
    pod_`prefix`..., podman-compose's), only ever ours: the storage is private to this stack."""
    for kind, fmt in (("pod", "{{.Name}}"), ("container", "{{.Names}}"), ("volume", "{{.Name}}"),
                      ("network", "{{.Name}}"), ("secret", "{{.Name}}")):
        args = [kind, "ps"] if kind in ("pod", "container") else [kind, "ls"]
        names = [n for n in podman(*args, *(["-a"] if kind == "container" else []), "--format", fmt,
                                   check=False).stdout.split() if n.startswith((prefix, f"pod_{prefix}"))]
        if names:
            podman(kind, "rm", "-f", *(["-v"] if kind == "container" else []), *names, check=False, timeout=120)


def image_sizes(names: Sequence[str]) -> dict[str, int]:
    """Bytes of each image, as `podman images` counts them (its layers, the base's included)."""
    return {n: int(podman("image", "inspect", "--format", "{{.Size}}", n).stdout) for n in names}


# ---------------------------------------------------------------- the smoke tests

def smoke(url: str, bin: Path | None = None) -> int:
    """Run docker/gabbi/placement-smoke.yaml against the Placement at `url` with gabbi-run (from the
    project venv), with a new provider and consumer uuid; remove both afterwards whatever happened."""
    provider, consumer = str(uuid.uuid4()), str(uuid.uuid4())
    gabbi = (bin or localstack.venv() / "bin") / "gabbi-run"
    env = {**os.environ, "SMOKE_PROVIDER": provider, "SMOKE_CONSUMER": consumer}
    try:
        return subprocess.run([str(gabbi), url, "--", str(SMOKE_FILE)], env=env, stdin=subprocess.DEVNULL).returncode
    finally:
        headers = {"x-auth-token": "admin", "openstack-api-version": f"placement {localstack.PLACEMENT_API_VERSION}"}
        for path in (f"/allocations/{consumer}", f"/resource_providers/{provider}"):
            try:
                urllib_delete(url + path, headers)
            except OSError as e:
                print(f"smoke: could not remove {path}: {e}", file=sys.stderr)


def urllib_delete(url: str, headers: dict[str, str]) -> None:
    """DELETE `url`; a 404 (nothing left to remove) is fine."""
    import urllib.error
    import urllib.request
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="DELETE", headers=headers), timeout=10).close()
    except urllib.error.HTTPError as e:
        if e.code != 404:
            raise

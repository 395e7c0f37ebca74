"""Configuration: compute.yaml (ecompute) and schedule.yaml (eschedule).

Each file is YAML mapped onto the dataclasses below; the dataclass defaults are
the documented defaults (all pointing at this machine). Unknown keys and values
of the wrong type are refused with the file and the dotted key named, because a
typo that silently falls back to a default is how a host ends up talking to the
wrong etcd.

Defaults for the endpoints may come from the environment (ECOMPUTE_ETCD_ENDPOINT,
ECOMPUTE_PLACEMENT_URL, ECOMPUTE_PLACEMENT_TOKEN, as `.stack/env` exports them);
a value in the file always wins over the environment.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import types
import typing
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from etcd_compute.contract import MAX_AMOUNT
from etcd_compute.errors import ConfigError

RESOURCE_CLASSES = ("VCPU", "MEMORY_MB", "DISK_GB")


def _env_list(name: str, default: str) -> list[str]:
    return [e.strip() for e in os.environ.get(name, default).split(",") if e.strip()]


@dataclass
class EtcdConfig:
    endpoints: list[str] = field(
        default_factory=lambda: _env_list("ECOMPUTE_ETCD_ENDPOINT", "http://127.0.0.1:2379"))
    prefix: str = "/etcd-compute"
    timeout: float = 5.0
    ca_cert: str | None = None
    cert_cert: str | None = None
    cert_key: str | None = None
    user: str | None = None
    password: str | None = None


@dataclass
class PlacementConfig:
    endpoint: str = field(
        default_factory=lambda: os.environ.get("ECOMPUTE_PLACEMENT_URL", "http://127.0.0.1:8778"))
    token: str = field(default_factory=lambda: os.environ.get("ECOMPUTE_PLACEMENT_TOKEN", "admin"))
    microversion: str = "1.39"
    timeout: float = 10.0
    retries: int = 2


@dataclass
class InventoryClassConfig:
    total: int | None = None  # None: measured with psutil
    reserved: int = 0
    allocation_ratio: float = 1.0
    max_unit: int | None = None  # None: total


def default_inventory() -> dict[str, InventoryClassConfig]:
    return {
        "VCPU": InventoryClassConfig(allocation_ratio=4.0),
        "MEMORY_MB": InventoryClassConfig(reserved=512),
        "DISK_GB": InventoryClassConfig(),
    }


@dataclass
class LibvirtConfig:
    uri: str = "qemu:///system"
    domain_type: str = "auto"  # auto | kvm | qemu


@dataclass
class NetworkConfig:
    """The libvirt network ecompute creates if missing (unused when `bridge` is set)."""

    name: str = "etcd-compute"
    mode: str = "nat"  # nat | isolated (no <forward>: nothing leaves the host) | none (no NIC)
    bridge_name: str = "ecbr0"
    address: str = "10.123.0.1/24"  # the bridge's address; DHCP hands out .100 to .250


@dataclass
class MetadataConfig:
    enabled: bool = True
    address: str = "169.254.169.254"
    port: int = 80
    metrics: str | None = None  # HOST:PORT of the metadata server's own /metrics; None: not served


@dataclass
class FenceConfig:
    """Self-fencing (ecompute/fence.py): a host that cannot prove its etcd lease for
    `lease_ttl - margin` seconds stops every domain it runs, before anyone may start them elsewhere."""

    enabled: bool = True
    margin: float | None = None  # seconds before the lease could lapse at which the fence acts; None: 0.3 * lease_ttl


@dataclass
class DeadlineConfig:
    """Seconds each kind of job may run before its worker is killed (a hung libvirt call, a
    download that drips); power changes and reboots get stop_timeout on top of `power`."""

    prepare: float = 300.0
    build: float = 2400.0  # above image_download.deadline: a slow download is named as such first
    power: float = 60.0
    destroy: float = 120.0
    list: float = 30.0  # listing the domains (also how the daemon sees that the hypervisor answers)


@dataclass
class ImageDownloadConfig:
    """How slow a fetch into the image cache may be before it is given up on (images.Pace)."""

    deadline: float = 1800.0  # seconds for the whole download
    min_rate: int = 10240  # bytes a second, over the last `window` seconds ...
    window: float = 30.0  # ... once the download is that old


def monitors_from_conf(text: str) -> tuple[tuple[str, int], ...]:
    """The monitors of a ceph.conf's `mon host`: each msgr v1 address (libvirt hands QEMU v1), or a
    bare address with the default port. `[v2:10.0.0.1:3300,v1:10.0.0.1:6789],10.0.0.2` gives
    (10.0.0.1, 6789), (10.0.0.2, 6789)."""
    match = re.search(r"^\s*mon[ _]host\s*=\s*(.+)$", text, re.MULTILINE)
    if not match:
        return ()
    found: list[tuple[str, int]] = []
    for group in re.findall(r"\[([^\]]*)\]|([^,\s\[\]]+)", match.group(1)):
        addresses = [a for a in (group[0] or group[1]).split(",") if a]
        v1 = [a[3:] for a in addresses if a.startswith("v1:")]
        plain = [a for a in addresses if not a.startswith(("v1:", "v2:"))]
        for address in (v1 or plain)[:1]:
            host, _, port = address.partition("/")[0].rpartition(":") if ":" in address else (address, "", "")
            found.append((host or address, int(port) if port.isdigit() else 6789))
    return tuple(found)



@dataclass
class RbdConfig:
    """Root disks in a Ceph pool (storage.backend rbd): what the host's Ceph client needs."""

    pool: str | None = None
    ceph_conf: str = "/etc/ceph/ceph.conf"
    cluster: str = "ceph"
    user: str = "etcd-compute"  # the cephx id (client.<user>)
    keyring: str | None = None  # None: /etc/ceph/<cluster>.client.<user>.keyring
    secret_uuid: str | None = None  # the libvirt secret holding the user's key
    monitors: list[str] = field(default_factory=list)  # HOST:PORT (v1) for QEMU; none: ceph_conf's mon host
    capacity_gb: int | None = None  # DISK_GB the pool offers in Placement; None: measured (ceph df)
    allocation_ratio: float = 1.0  # of that DISK_GB (clones are thin: >1 overcommits the pool)

    def keyring_path(self) -> str:
        return self.keyring or f"/etc/ceph/{self.cluster}.client.{self.user}.keyring"

    def pool_provider(self) -> str:
        """The pool's sharing provider in Placement: one uuid for every host of the same pool of the
        same cluster (its fsid, from ceph_conf; else its monitors)."""
        text = Path(self.ceph_conf).read_text() if Path(self.ceph_conf).exists() else ""
        fsid = re.search(r"^\s*fsid\s*=\s*(\S+)", text, re.MULTILINE)
        where = fsid.group(1) if fsid else ",".join(f"{h}:{p}" for h, p in self.monitor_addresses())
        return str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"etcd-compute:rbd:{where}:{self.pool}"))

    def monitor_addresses(self) -> tuple[tuple[str, int], ...]:
        """`monitors`, or else the msgr v1 addresses of ceph_conf's `mon host` (what libvirt hands QEMU)."""
        if self.monitors:
            return tuple((m.rpartition(":")[0], int(m.rpartition(":")[2])) for m in self.monitors)
        return monitors_from_conf(Path(self.ceph_conf).read_text())


@dataclass
class StorageConfig:
    backend: str = "local"  # local (qcow2 overlays on this host) | rbd (clones in a Ceph pool)
    rbd: RbdConfig = field(default_factory=RbdConfig)


@dataclass
class ComputeConfig:
    uuid: str | None = None  # None: derived from /etc/machine-id, stable across restarts
    name: str | None = None  # None: the host name
    etcd: EtcdConfig = field(default_factory=EtcdConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    libvirt: LibvirtConfig = field(default_factory=LibvirtConfig)
    instances_path: str = "/var/lib/etcd-compute/instances"
    image_cache_path: str = "/var/lib/etcd-compute/images"
    # Local images (paths, file:// URLs, kernels, initrds) only from these directories; none: http(s) only.
    image_dirs: list[str] = field(default_factory=list)
    image_max_bytes: int = 20 << 30  # largest image a host copies or downloads into its cache
    workers: int = 2
    resize: bool = True
    bridge: str | None = None
    network: NetworkConfig = field(default_factory=NetworkConfig)
    metadata: MetadataConfig = field(default_factory=MetadataConfig)
    ip_timeout: float = 120.0
    traits: list[str] = field(default_factory=list)
    # Per resource class; a class left out keeps its default below.
    inventory: dict[str, InventoryClassConfig] = field(default_factory=lambda: default_inventory())
    resync_interval: float = 30.0
    lease_ttl: int = 10  # seconds without a refresh before the host counts as DOWN
    fence: FenceConfig = field(default_factory=FenceConfig)
    deadlines: DeadlineConfig = field(default_factory=DeadlineConfig)
    retries: int = 3  # a job that fails (or times out) this often in a row parks its instance
    image_download: ImageDownloadConfig = field(default_factory=ImageDownloadConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    stop_timeout: float = 60.0  # graceful guest shutdown (stop, reboot) before it is powered off (Nova's too)
    config_drive: bool = True  # false: no instance of this host gets one (the metadata server alone)
    crash_restarts: int = 0  # a guest that panicked is started again up to this often in a row; 0: left off
    console_interval: float = 2.0  # seconds between looks at the consoles to publish (eschedule console)
    shutdown_timeout: float = 20.0
    log_level: str = "INFO"
    metrics: str | None = None  # HOST:PORT where ecompute serves Prometheus /metrics; None: not served
    metrics_interval: float = 15.0  # seconds between samples of each instance's counters (an hour kept)
    shards: int = 16  # shard aggregates hosts are spread over (schedule.yaml's must match); 1: none

    def host_uuid(self) -> str:
        if self.uuid:
            return self.uuid
        try:
            seed = Path("/etc/machine-id").read_text().strip()
        except OSError:
            seed = os.uname().nodename
        return str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, "etcd-compute:" + seed))

    def host_name(self) -> str:
        return self.name or os.uname().nodename

    def fence_margin(self) -> float | None:
        """Seconds before the lease could lapse at which the fence acts; None: no fence."""
        if not self.fence.enabled:
            return None
        return self.fence.margin if self.fence.margin is not None else round(0.3 * self.lease_ttl, 3)

    def attachment(self) -> str | None:
        """What guests' NICs attach to, in words; None: guests get no NIC (and no address)."""
        if self.bridge:
            return f"bridge {self.bridge}"
        return None if self.network.mode == "none" else f"network {self.network.name}"


@dataclass
class EvacuateConfig:
    """`eschedule evacuate`: a host is evacuated once DOWN for its lease_ttl + fence_margin + grace."""

    grace: float = 0.0  # seconds beyond the fence window for `evacuate HOST` (--grace overrides)
    auto_grace: float = 15.0  # the same for `evacuate --auto` (its guests were fenced by then: pure waiting)
    interval: float = 2.0  # seconds between the evacuator's rounds
    leader_ttl: int = 10  # the acting evacuator's etcd lease: another takes over this long after it dies
    metrics: str | None = None  # HOST:PORT of the evacuator's Prometheus metrics (--metrics overrides)


@dataclass
class ScheduleConfig:
    etcd: EtcdConfig = field(default_factory=EtcdConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    project_id: str = "etcd-compute"
    user_id: str = "etcd-compute"
    limit: int = 50
    default_image: str | None = "default"  # a name in the image catalogue (or a URL or path, as IMAGE)
    # Direct kernel boot (like Glance's kernel_id/ramdisk_id): for images without a bootloader.
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = None
    ssh_keys: list[str] = field(default_factory=list)  # public key files put into every instance
    ssh_user: str | None = None  # whom `eschedule ssh` logs in as (None: ssh's default, the local user)
    user_data: str | None = None  # a file given to every instance as cloud-init user-data
    wait_timeout: float = 300.0
    shards: int = 16  # as compute.yaml's: eschedule asks one shard at random first; 1: never narrows
    evacuate: EvacuateConfig = field(default_factory=EvacuateConfig)
    # The Ceph pool of the rbd hosts, as their storage.rbd names it (pool, ceph_conf, cluster, user,
    # keyring): volumes are made in it (`eschedule volume`), instances' disks snapshotted in it
    # (`eschedule snapshot`). No pool: neither, in this cloud.
    ceph: RbdConfig = field(default_factory=RbdConfig)


# The scalar types a config value may have: (accepts the YAML value?, what it must be, convert).
_SCALARS: dict[Any, tuple[Callable[[Any], bool], str, Callable[[Any], Any]]] = {
    float: (lambda v: isinstance(v, int | float) and not isinstance(v, bool), "a number", float),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer", int),
    bool: (lambda v: isinstance(v, bool), "true or false", bool),
    str: (lambda v: isinstance(v, str | int | float) and not isinstance(v, bool), "a string", str),
}


def _convert(value: Any, tp: Any, where: str, path: str) -> Any:
    """Check `value` against the annotation `tp`, building dataclasses; raise naming the key."""
    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{path}: key '{where}' must be {expected}, got {value!r}")

    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], where, path)
    if dataclasses.is_dataclass(tp):
        cls = typing.cast(type, tp)
        if value is None:
            return cls()
        if not isinstance(value, dict):
            raise bad("a mapping")
        return _build(cls, value, path, where + ".")
    if origin in (list, dict):
        if not isinstance(value, origin):
            raise bad("a list" if origin is list else "a mapping")
        item = typing.get_args(tp)[-1]
        if isinstance(value, list):
            return [_convert(v, item, f"{where}[{i}]", path) for i, v in enumerate(value)]
        return {str(k): _convert(v, item, f"{where}.{k}", path) for k, v in value.items()}
    if tp in _SCALARS:
        accepts, expected, convert = _SCALARS[tp]
        if not accepts(value):
            raise bad(expected)
        return convert(value)
    raise AssertionError(f"unsupported config type {tp}")


def _build(cls: type, data: dict, path: str, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"{path}: unknown key '{prefix}{key}' (known: {', '.join(sorted(names))})")
        kwargs[key] = _convert(value, hints[key], prefix + key, path)
    return cls(**kwargs)


# Inclusive bounds of the numeric keys, by dotted key; a value outside (NaN too) is refused,
# never clamped. Timeouts must be positive; a resync more often than once a second only burns
# CPU; a lease beyond an hour keeps a dead host UP for that long (and etcd refuses huge ones).
_RANGES: dict[str, tuple[float, float]] = {
    "etcd.timeout": (0.1, 3600), "placement.timeout": (0.1, 3600), "placement.retries": (0, 10),
    "limit": (1, 10000), "wait_timeout": (0.1, 86400),
    "workers": (1, 64), "metadata.port": (1, 65535), "ip_timeout": (1, 86400),
    "resync_interval": (1, 86400), "console_interval": (0.5, 3600), "metrics_interval": (1, 300),
    "lease_ttl": (2, 3600), "stop_timeout": (0.1, 3600),
    "crash_restarts": (0, 100),
    "shutdown_timeout": (0.1, 3600), "shards": (1, 1024),  # placement.MAX_SHARDS
    "deadlines.prepare": (1, 86400), "deadlines.build": (1, 86400), "deadlines.power": (1, 86400),
    "deadlines.destroy": (1, 86400), "deadlines.list": (1, 3600), "retries": (1, 100),
    "image_download.deadline": (1, 86400), "image_download.min_rate": (0, 2**40), "image_download.window": (1, 3600),
    "evacuate.grace": (0, 86400), "evacuate.auto_grace": (0, 86400), "evacuate.interval": (0.1, 3600),
    "evacuate.leader_ttl": (2, 3600),
}
_INVENTORY_RANGES: dict[str, tuple[float, float]] = {
    "total": (0, MAX_AMOUNT), "reserved": (0, MAX_AMOUNT), "allocation_ratio": (0.01, 1000),
    "max_unit": (1, MAX_AMOUNT),
}


def _check_ranges(cfg: Any, path: str) -> None:
    def check(key: str, value: Any, low: float, high: float) -> None:
        if value is not None and not low <= value <= high:
            raise ConfigError(f"{path}: key '{key}' must be from {low:g} to {high:g}, got {value!r}")

    for key, (low, high) in _RANGES.items():
        value: Any = cfg
        for part in key.split("."):
            value = getattr(value, part, None)  # None: a key the other file's config has
        check(key, value, low, high)
    for rc, opts in getattr(cfg, "inventory", {}).items():
        for name, (low, high) in _INVENTORY_RANGES.items():
            check(f"inventory.{rc}.{name}", getattr(opts, name), low, high)


def _url_problem(url: str, port_needed: bool) -> str | None:
    """Why `url` is no http(s)://HOST[:PORT] URL, or None."""
    try:
        parts = urlsplit(url)
        port = parts.port  # raises on a port that is no number or out of range
    except ValueError as exc:
        return str(exc)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "no http(s)://HOST"
    if port == 0 or (port is None and port_needed):
        return "no port"
    return None


def _validate_network(cfg: ComputeConfig, path: str) -> None:
    if cfg.network.mode not in ("nat", "isolated", "none"):
        raise ConfigError(f"{path}: key 'network.mode' must be nat, isolated or none")
    try:
        iface = ipaddress.ip_interface(cfg.network.address)
        if iface.version != 4 or iface.network.prefixlen > 24:
            raise ValueError
    except ValueError:
        raise ConfigError(f"{path}: key 'network.address' must be an IPv4 address/prefix, "
                          f"prefix 24 or shorter, like 10.123.0.1/24") from None
    try:
        ipaddress.IPv4Address(cfg.metadata.address)
    except ValueError:
        raise ConfigError(f"{path}: key 'metadata.address' must be an IPv4 address") from None


def _validate_compute(cfg: ComputeConfig, path: str) -> None:
    if cfg.libvirt.domain_type not in ("auto", "kvm", "qemu", "test"):
        raise ConfigError(f"{path}: key 'libvirt.domain_type' must be auto, kvm or qemu")
    if cfg.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"{path}: key 'log_level' must be DEBUG, INFO, WARNING or ERROR")
    cfg.log_level = cfg.log_level.upper()
    _validate_network(cfg, path)
    for name in ("instances_path", "image_cache_path"):
        where = Path(getattr(cfg, name))
        if where.exists() and not where.is_dir():
            raise ConfigError(f"{path}: key '{name}' names {where}, which is not a directory")
    for d in cfg.image_dirs:
        if not d.startswith("/"):
            raise ConfigError(f"{path}: key 'image_dirs' entry {d!r} must be an absolute path")
    if cfg.image_max_bytes < 1:
        raise ConfigError(f"{path}: key 'image_max_bytes' must be at least 1 (bytes)")
    for rc in cfg.inventory:
        if rc not in RESOURCE_CLASSES:
            raise ConfigError(f"{path}: key 'inventory.{rc}' is not one of {', '.join(RESOURCE_CLASSES)}")
    cfg.inventory = default_inventory() | cfg.inventory
    _validate_fence(cfg, path)
    _validate_storage(cfg, path)
    if cfg.uuid is not None:
        try:
            cfg.uuid = str(uuidlib.UUID(cfg.uuid))
        except ValueError:
            raise ConfigError(f"{path}: key 'uuid' is not a uuid: {cfg.uuid!r}") from None


def _validate_fence(cfg: ComputeConfig, path: str) -> None:
    """The fence acts `margin` seconds before the lease could lapse: that must leave it room to
    act, and the host room to refresh its lease (every lease_ttl / 4) before it acts."""
    if cfg.fence.margin is not None and not 0.5 <= cfg.fence.margin <= cfg.lease_ttl / 2:
        raise ConfigError(f"{path}: key 'fence.margin' must be from 0.5 to half of lease_ttl "
                          f"({cfg.lease_ttl / 2:g}), got {cfg.fence.margin!r}")


def _validate_storage(cfg: ComputeConfig, path: str) -> None:
    storage = cfg.storage
    if storage.backend not in ("local", "rbd"):
        raise ConfigError(f"{path}: key 'storage.backend' must be local or rbd, got {storage.backend!r}")
    if storage.backend != "rbd":
        return
    rbd = storage.rbd
    for key in ("pool", "secret_uuid"):
        if not getattr(rbd, key):
            raise ConfigError(f"{path}: key 'storage.rbd.{key}' is needed with storage.backend rbd")
    for key, file in (("ceph_conf", rbd.ceph_conf), ("keyring", rbd.keyring_path())):
        if not os.access(file, os.R_OK):
            raise ConfigError(f"{path}: key 'storage.rbd.{key}' names {file}, which cannot be read")
    for monitor in rbd.monitors:
        host, _, port = monitor.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"{path}: key 'storage.rbd.monitors' entry {monitor!r} must be HOST:PORT")
    if not rbd.monitor_addresses():
        raise ConfigError(f"{path}: {rbd.ceph_conf} names no monitor ('mon host'): set storage.rbd.monitors")


def _check_secrets(cfg: Any, path: Path) -> None:
    """A file holding a password, a token or naming a private key must not be world-readable."""
    holds = [name for name, value in (("etcd.password", cfg.etcd.password),
                                      ("placement.token", None if cfg.placement.token == "admin"
                                       else cfg.placement.token)) if value]
    if holds and path.stat().st_mode & 0o004:
        raise ConfigError(f"{path}: holds {' and '.join(holds)} but is readable by everyone; chmod o-r {path}")
    key = cfg.etcd.cert_key
    if key and Path(key).exists() and Path(key).stat().st_mode & 0o004:
        raise ConfigError(f"{path}: key 'etcd.cert_key' names {key}, which is readable by everyone; chmod o-r it")


def _validate_common(cfg: Any, path: str) -> None:
    etcd = cfg.etcd
    for a, b in (("cert_cert", "cert_key"), ("cert_key", "cert_cert"), ("user", "password"), ("password", "user")):
        if getattr(etcd, a) and not getattr(etcd, b):
            raise ConfigError(f"{path}: key 'etcd.{a}' needs 'etcd.{b}' too")
    if etcd.cert_cert and not etcd.ca_cert:
        raise ConfigError(f"{path}: key 'etcd.cert_cert' needs 'etcd.ca_cert' (TLS is used only with a CA)")
    for name in ("ca_cert", "cert_cert", "cert_key"):
        file = getattr(etcd, name)
        if file and not os.access(file, os.R_OK):
            raise ConfigError(f"{path}: key 'etcd.{name}' names {file}, which cannot be read")
    if not cfg.etcd.endpoints:
        raise ConfigError(f"{path}: key 'etcd.endpoints' must name at least one endpoint")
    for ep in cfg.etcd.endpoints:
        problem = _url_problem(ep, port_needed=True)
        if problem:
            raise ConfigError(f"{path}: key 'etcd.endpoints' entry {ep!r} must look like http://HOST:PORT ({problem})")
    problem = _url_problem(cfg.placement.endpoint, port_needed=False)
    if problem:
        raise ConfigError(f"{path}: key 'placement.endpoint' must be an http(s) URL like http://HOST:PORT, "
                          f"got {cfg.placement.endpoint!r} ({problem})")
    _check_ranges(cfg, path)


def load(cls: type, path: str | None, defaults: tuple[str, ...] = ()) -> Any:
    """Load `cls` from `path`, or from the first existing default path, or built-in defaults."""
    if path is None:
        path = next((p for p in defaults if Path(p).is_file()), None)
        if path is None:
            cfg = cls()
            _validate_common(cfg, "defaults")
            return cfg
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{path}: malformed YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys to values")
    cfg = _build(cls, data, path)
    _validate_common(cfg, path)
    _check_secrets(cfg, Path(path))
    if isinstance(cfg, ComputeConfig):
        _validate_compute(cfg, path)
    return cfg


def load_compute(path: str | None) -> ComputeConfig:
    return load(ComputeConfig, path, ("compute.yaml", "/etc/etcd-compute/compute.yaml"))


def load_schedule(path: str | None) -> ScheduleConfig:
    return load(ScheduleConfig, path, ("schedule.yaml", "/etc/etcd-compute/schedule.yaml"))

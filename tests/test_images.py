"""The image cache against a real HTTP server on loopback: download once, check, never leave partial files."""

from __future__ import annotations

import hashlib
import http.server
import os
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from devstack.harness import Served, free_port, wait_until
from etcd_compute import config
from etcd_compute.ecompute import images, jobs
from etcd_compute.ecompute.daemon import worker_settings
from etcd_compute.ecompute.images import ImageError
from etcd_compute.errors import ConfigError

from conftest import Cloud

QUERY = "resources=VCPU:1,MEMORY_MB:128,DISK_GB:1"
UUID = "0b7a1e3c-5d1f-4c1e-9a0e-6f1d2c3b4a59"


def qcow2(virtual: int, backing: bool = False) -> bytes:
    """A minimal qcow2 header: magic, version 3, backing file offset, cluster bits, size."""
    head = b"QFI\xfb" + struct.pack(">IQII", 3, 512 if backing else 0, 0, 16) + struct.pack(">Q", virtual)
    return head.ljust(64 * 1024, b"\0")


def raw_disk(size: int = 1 << 20) -> bytes:
    data = bytearray(size)
    data[510:512] = b"\x55\xaa"
    return bytes(data)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    (tmp_path / "www").mkdir()
    s = Served(tmp_path / "www")
    yield s
    s.close()


def cache_files(cache: Path) -> list[str]:
    """The images in a cache (not the locks, nor the digests kept beside them)."""
    return sorted(p.name for p in cache.iterdir() if not p.name.endswith((".lock", ".sha256"))) if cache.exists() \
        else []


class Trickle:
    """An HTTP server whose one file arrives slowly: `block` bytes every `every` seconds, `total`
    in all (None: without end, and without a length), with a Content-Length header or without
    one (read to the close)."""

    def __init__(self, total: int | None = None, *, block: int = 64 << 10, every: float = 0.02,
                 length: bool = True) -> None:
        self.sent = 0
        trickle = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                self.send_response(200)
                if length and total is not None:
                    self.send_header("Content-Length", str(total))
                self.end_headers()
                first = raw_disk(block)  # what arrives looks like a disk
                try:
                    while total is None or trickle.sent < total:
                        n = block if total is None else min(block, total - trickle.sent)
                        self.wfile.write(first[:n] if trickle.sent == 0 else bytes(n))
                        self.wfile.flush()
                        trickle.sent += n
                        time.sleep(every)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client went away, as a cancelled download does
                self.close_connection = True

            def log_message(self, *a: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/disk.raw"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Run fn() on a thread of its own; the dict gets 'result' or 'error' when it ends."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = fn()
        except Exception as exc:  # noqa: BLE001
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def refused(fn: Callable[[], Any], timeout: float = 10) -> str:
    """fn() must raise ImageError within `timeout` seconds (not hang on a FIFO); its message."""
    t, out = in_thread(fn)
    t.join(timeout)
    assert not t.is_alive(), f"still running after {timeout}s"
    assert isinstance(out.get("error"), ImageError), out
    return str(out["error"])


def test_probe_formats(tmp_path: Path) -> None:
    f = tmp_path / "img"
    f.write_bytes(qcow2(5 << 30))
    assert images.probe(f) == images.Image(f, "qcow2", 5 << 30)
    f.write_bytes(raw_disk())
    assert images.probe(f).format == "raw" and images.probe(f).virtual_size == 1 << 20
    for data, message in [(b"<html>not found</html>" * 100, "not a disk image"),
                          (qcow2(1 << 30, backing=True), "backing file of its own"),
                          (b"KDMV" + bytes(4096), "unsupported image format")]:
        f.write_bytes(data)
        with pytest.raises(ImageError, match=message):
            images.probe(f)


def test_download_once_then_cached(served: Served, tmp_path: Path) -> None:
    url = served.add("disk.qcow2", qcow2(1 << 30))
    cache = tmp_path / "cache"
    first = images.fetch(url, cache)
    second = images.fetch(url, cache)
    assert first == second and first.format == "qcow2" and first.virtual_size == 1 << 30
    assert served.hits == {"/disk.qcow2": 1}
    assert cache_files(cache) == [first.path.name]


def test_expected_sha256(served: Served, tmp_path: Path) -> None:
    data = raw_disk()
    url = served.add("disk.raw", data)
    cache = tmp_path / "cache"
    with pytest.raises(ImageError, match="sha256 is"):
        images.fetch(url, cache, sha256="0" * 64)
    assert cache_files(cache) == []
    assert images.fetch(url, cache, sha256=hashlib.sha256(data).hexdigest()).format == "raw"


def test_a_pinned_sha256_is_checked_on_every_use_cached_or_not(served: Served, tmp_path: Path) -> None:
    """Issue 22: a wrong --image-sha256 was ignored once the image was in the cache (the digest was
    checked only while copying it in): a cached image is the same integrity risk as a download."""
    data = raw_disk()
    right, wrong = hashlib.sha256(data).hexdigest(), "0" * 64
    url = served.add("disk.raw", data)
    cache = tmp_path / "cache"
    images.fetch(url, cache)  # cached without a pin
    with pytest.raises(ImageError, match=f"sha256 is {right}, expected {wrong}"):
        images.fetch(url, cache, sha256=wrong)
    assert images.fetch(url, cache, sha256=right.upper()).format == "raw"
    (cache / cache_files(cache)[0]).write_bytes(raw_disk(2 << 20))
    with pytest.raises(ImageError, match="sha256 is"):  # the cached file changed behind our back
        images.fetch(url, cache, sha256=right)
    assert served.hits == {"/disk.raw": 1}  # all from the cache


@pytest.mark.parametrize("name, message", [("missing.img", "HTTP 404"), ("garbage.img", "not a disk image")])
def test_bad_images_leave_nothing(served: Served, tmp_path: Path, name: str, message: str) -> None:
    served.add("garbage.img", b"this is no disk\n" * 4096)
    cache = tmp_path / "cache"
    with pytest.raises(ImageError, match=message):
        images.fetch(f"{served.url}/{name}", cache)
    assert cache_files(cache) == []


def test_unreachable_host(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="cannot reach 127.0.0.1"):
        images.fetch(f"http://127.0.0.1:{free_port()}/x.img", tmp_path / "cache")


def test_local_paths_and_file_urls(tmp_path: Path) -> None:
    src = tmp_path / "disk.raw"
    src.write_bytes(raw_disk())
    cache = tmp_path / "cache"
    a = images.fetch(str(src), cache, allowed_dirs=[str(tmp_path)])
    b = images.fetch(f"file://{src}", cache, allowed_dirs=[str(tmp_path)])
    assert a.format == b.format == "raw" and a.path.read_bytes() == src.read_bytes()
    with pytest.raises(ImageError, match="No such file"):
        images.fetch(str(tmp_path / "nope"), cache, allowed_dirs=[str(tmp_path)])
    for ref in ("relative/disk.img", "ftp://example.invalid/x.img"):
        with pytest.raises(ImageError, match="expected an http"):
            images.check_scheme(ref)


# -- issue 10, finding 12: an IMAGE could be any file of the compute host --------------------------

def test_local_images_only_from_the_directories_the_host_allows(tmp_path: Path) -> None:
    allowed, outside, cache = tmp_path / "allowed", tmp_path / "outside", tmp_path / "cache"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "disk.raw").write_bytes(raw_disk())
    secret = outside / "secret.raw"
    secret.write_bytes(raw_disk())
    secret.chmod(0o600)
    (allowed / "link.raw").symlink_to(secret)
    (allowed / "sub").mkdir()
    dirs = [str(allowed)]
    good = images.fetch(str(allowed / "disk.raw"), cache, allowed_dirs=dirs)
    assert images.fetch(f"file://{allowed}/sub/../disk.raw", cache, allowed_dirs=dirs).format == "raw"
    for ref in (str(secret), f"file://{secret}", str(allowed / "link.raw"), f"{allowed}/../outside/secret.raw",
                f"file://{allowed}/sub/../../outside/secret.raw", "/dev/zero", "/etc/shadow"):
        for kind in ("disk", "file"):  # kernels and initrds obey the same rule
            message = refused(lambda ref=ref, kind=kind: images.fetch(ref, cache, allowed_dirs=dirs, kind=kind))
            assert "not in a directory this host allows local images from (image_dirs)" in message, message
    # No image_dirs (the default): no local images at all; a file that does not exist there says so.
    assert "(image_dirs)" in refused(lambda: images.fetch(str(allowed / "disk.raw"), tmp_path / "c2"))
    assert "No such file" in refused(lambda: images.fetch(str(allowed / "nope.raw"), cache, allowed_dirs=dirs))
    # Inside an allowed directory but no regular file: a character device, a FIFO (without hanging).
    os.mkfifo(allowed / "fifo")
    for ref, where in (("/dev/null", ["/dev"]), ("/dev/zero", ["/dev"]), (str(allowed / "fifo"), dirs)):
        message = refused(lambda ref=ref, where=where: images.fetch(ref, cache, allowed_dirs=where, kind="file"))
        assert "not a regular file" in message, message
    # The cache and the instances' files are never a source, even inside an allowed directory.
    instances = tmp_path / "instances"
    instances.mkdir()
    (instances / "other.qcow2").write_bytes(qcow2(1 << 30))
    everything = [str(tmp_path)]
    for ref in (str(good.path), str(instances / "other.qcow2")):
        message = refused(lambda ref=ref: images.fetch(ref, cache, allowed_dirs=everything,
                                                       private_dirs=[str(instances)]))
        assert "not in a directory this host allows" in message, message
    assert cache_files(cache) == [good.path.name]  # nothing of the refused ones was copied


def test_a_directory_swapped_for_a_symlink_after_the_check_leads_nowhere(tmp_path: Path) -> None:
    """The race a user with write access to an allowed directory could run: checked, then swapped."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    (allowed / "sub").mkdir(parents=True)
    outside.mkdir()
    (allowed / "sub" / "disk.raw").write_bytes(raw_disk())
    (outside / "disk.raw").write_bytes(raw_disk().replace(bytes(6), b"SECRET", 1))
    source = images._local_source("ref", allowed / "sub" / "disk.raw", [str(allowed)], [])
    (allowed / "sub").rename(allowed / "old")
    (allowed / "sub").symlink_to(outside)
    sink = images._Sink("ref", 1 << 30, lambda: None)
    sink.out = (tmp_path / "copy").open("wb")
    with pytest.raises(ImageError, match="ref: "):
        images._copy_local("ref", source, sink)
    sink.out.close()
    assert b"SECRET" not in (tmp_path / "copy").read_bytes()


def test_image_config_keys(tmp_path: Path) -> None:
    assert config.ComputeConfig().image_dirs == [] and config.ComputeConfig().image_max_bytes == 20 << 30
    f = tmp_path / "c.yaml"
    f.write_text("image_dirs: [/srv/images]\nimage_max_bytes: 1048576\n")
    settings = worker_settings(config.load_compute(str(f)))
    assert settings.image_dirs == ("/srv/images",) and settings.image_max_bytes == 1 << 20
    for text, message in (("image_dirs: [images]", "key 'image_dirs' entry 'images' must be an absolute path"),
                          ("image_dirs: /srv", "key 'image_dirs' must be a list"),
                          ("image_max_bytes: 0", "key 'image_max_bytes' must be at least 1")):
        f.write_text(text + "\n")
        with pytest.raises(ConfigError, match=message):
            config.load_compute(str(f))


def test_size_limit_aborts_and_leaves_nothing(served: Served, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    limit = 1 << 20
    too_big = r"larger than this host's limit of 1.0 MiB \(image_max_bytes\)"
    url = served.add("big.raw", raw_disk(3 << 20))  # Content-Length says it is too big
    with pytest.raises(ImageError, match=too_big):
        images.fetch(url, cache, max_bytes=limit)
    assert cache_files(cache) == []
    trickle = Trickle(3 << 20, block=256 << 10, every=0.01, length=False)  # no length: counted as it comes
    try:
        with pytest.raises(ImageError, match=too_big):
            images.fetch(trickle.url, cache, max_bytes=limit)
        time.sleep(0.2)
        assert trickle.sent < 3 << 20  # it stopped reading
    finally:
        trickle.close()
    assert cache_files(cache) == []
    local = tmp_path / "big.raw"
    local.write_bytes(raw_disk(3 << 20))
    with pytest.raises(ImageError, match=too_big):
        images.fetch(str(local), cache, allowed_dirs=[str(tmp_path)], max_bytes=limit)
    assert cache_files(cache) == []
    assert images.fetch(url, cache, max_bytes=3 << 20).virtual_size == 3 << 20  # up to the limit is fine


def test_cancel_marker_stops_a_slow_download_promptly(served: Served, tmp_path: Path) -> None:
    cache, instances = tmp_path / "cache", tmp_path / "instances"
    marker = jobs.cancel_marker(str(instances), UUID)
    assert marker.parent == instances and UUID in marker.name and not marker.exists()
    instances.mkdir()
    trickle = Trickle()  # endless: 64 KiB every 20 ms
    try:
        t, out = in_thread(lambda: images.fetch(trickle.url, cache, cancel=marker))
        wait_until(lambda: trickle.sent > 1 << 20, 20, "the download to be under way")
        marker.touch()  # what the daemon does when the instance being built is deleted
        touched = time.monotonic()
        t.join(10)
        assert not t.is_alive(), "the download went on after the instance was deleted"
        assert time.monotonic() - touched < 2
        assert isinstance(out.get("error"), ImageError), out
        assert "instance was deleted" in str(out["error"])
        assert cache_files(cache) == []  # no partial file
        sent = trickle.sent
        time.sleep(0.3)
        assert trickle.sent - sent <= 256 << 10  # the server is no longer being read
    finally:
        trickle.close()
    # A marker that is already there: nothing is fetched at all, local or remote.
    url = served.add("disk.raw", raw_disk())
    with pytest.raises(ImageError, match="instance was deleted"):
        images.fetch(url, cache, cancel=marker)
    assert served.hits == {}
    with pytest.raises(ImageError, match="instance was deleted"):
        images.fetch(str(served.root / "disk.raw"), cache, allowed_dirs=[str(served.root)], cancel=marker)
    assert cache_files(cache) == []


def test_cache_is_not_readable_by_others_and_never_widens_a_mode(served: Served, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    downloaded = images.fetch(served.add("disk.raw", raw_disk()), cache)
    private = tmp_path / "private.raw"
    private.write_bytes(raw_disk(2 << 20))
    private.chmod(0o600)  # root's own file must not become readable by anyone else
    copied = images.fetch(str(private), cache, allowed_dirs=[str(tmp_path)])
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"kernel" * 1000)
    kernel.chmod(0o644)
    file = images.fetch(str(kernel), cache, allowed_dirs=[str(tmp_path)], kind="file")
    # QEMU (libvirt-qemu) must pass through the directory; libvirt's dynamic ownership chowns
    # the images a domain uses (its backing files too) to it, so it needs no read bit for others.
    assert stat.S_IMODE(cache.stat().st_mode) == 0o711
    for image in (downloaded, copied, file):
        assert stat.S_IMODE(image.path.stat().st_mode) == 0o600, image


def test_host_refuses_images_outside_image_dirs_and_over_the_size_limit(cloud: Cloud, tmp_path: Path) -> None:
    """Through ecompute: the instance goes to ERROR saying why, and nothing reaches the cache."""
    cfg = cloud.compute_config("host1", image_max_bytes=2 << 20)
    files = Path(cfg["instances_path"]).parent  # the test harness allows the host's own files
    cache = Path(cfg["image_cache_path"])
    files.mkdir(parents=True, exist_ok=True)
    cloud.compute("host1", image_max_bytes=2 << 20)
    secret = tmp_path / "secret.raw"
    secret.write_bytes(raw_disk().replace(bytes(6), b"SECRET", 1))
    secret.chmod(0o600)
    good = files / "disk.raw"
    good.write_bytes(raw_disk())
    big = files / "big.raw"
    big.write_bytes(raw_disk(3 << 20))
    os.mkfifo(files / "fifo")
    cases = [
        ([str(secret)], f"image {secret}: not in a directory this host allows local images from (image_dirs)"),
        ([f"file://{secret}"], "not in a directory this host allows local images from (image_dirs)"),
        ([str(good), "--kernel", str(secret)], "not in a directory this host allows local images"),
        ([str(good), "--kernel", str(good), "--initrd", "/etc/shadow"], "not in a directory this host allows"),
        (["/dev/zero"], "not in a directory this host allows local images from (image_dirs)"),
        ([str(files / "fifo")], "not a regular file"),
        ([str(big)], "larger than this host's limit of 2.0 MiB (image_max_bytes)"),
    ]
    for args, reason in cases:
        r = cloud.eschedule(QUERY, *args, "--wait", "--json")
        assert r.rc == 8, (args, r)
        view = r.json()
        assert view["state"] == "ERROR" and reason in view["reason"], (args, view)
        # Nothing refused reached the cache (the allowed disk of the kernel cases may have).
        cached = [cache / name for name in cache_files(cache)]
        assert all(p.read_bytes() == good.read_bytes() for p in cached), args
        assert cloud.eschedule("destroy", view["uuid"], "--wait").rc == 0
    r = cloud.eschedule(QUERY, str(good), "--wait", "--json")  # an allowed one still works
    assert r.rc == 0 and r.json()["state"] == "ACTIVE", r
    assert len(cache_files(cache)) == 1
    assert not list(Path(cfg["instances_path"]).glob(".*.cancel"))  # the build leaves no marker
    # A marker the daemon set just after the build ended goes with the destroy.
    marker = jobs.cancel_marker(cfg["instances_path"], r.json()["uuid"])
    marker.touch()
    assert cloud.eschedule("destroy", r.json()["uuid"], "--wait").rc == 0
    assert not marker.exists()


def test_build_stops_its_download_when_marked_and_removes_the_marker(cloud: Cloud) -> None:
    """The worker's side of a destroy during a slow download: the daemon touches the instance's
    cancel marker (here the test does); the build ends in ERROR at once, leaving no partial file
    and no marker behind."""
    cfg = cloud.compute_config("host1")
    cache, instances = Path(cfg["image_cache_path"]), Path(cfg["instances_path"])
    cloud.compute("host1")
    trickle = Trickle()  # endless
    try:
        uuid = cloud.eschedule(QUERY, trickle.url, "--json").json()["uuid"]
        wait_until(lambda: trickle.sent > 1 << 20, 30, "the download to be under way")
        marker = jobs.cancel_marker(str(instances), uuid)
        marker.touch()
        touched = time.monotonic()
        view = wait_until(lambda: (v := cloud.show(uuid))["state"] == "ERROR" and v, 10, "ERROR")
        assert time.monotonic() - touched < 5
        assert "instance was deleted" in view["reason"], view
        assert not marker.exists()
        assert cache_files(cache) == []
        assert list(instances.iterdir()) == []
    finally:
        trickle.close()
    assert cloud.eschedule("destroy", uuid, "--wait").rc == 0


@pytest.mark.parametrize(("trickle", "pace", "why"), [
    ({"block": 1, "every": 1.0}, {"min_rate": 4096, "window": 2}, "fetch too slow: "),  # 1 byte a second
    ({"block": 64 << 10, "every": 0.02}, {"deadline": 3}, "fetch did not finish within 3s"),  # fast, without end
])
def test_a_download_that_drips_or_never_ends_is_given_up_on_with_its_reason(
        cloud: Cloud, trickle: dict[str, Any], pace: dict[str, Any], why: str) -> None:
    """An image server dripping 1 byte a second used to keep its instance BUILDING for ever (only a
    destroy stopped it): the download now has an overall deadline and a minimum rate over a
    window (compute.yaml's image_download), and the instance is ERROR with the one that was hit."""
    host = cloud.compute("host1", image_download=pace)
    server = Trickle(**trickle)
    try:
        uuid = cloud.eschedule(QUERY, server.url, "--json").json()["uuid"]
        view = wait_until(lambda: (v := cloud.show(uuid))["state"] == "ERROR" and v, 60, "ERROR")
        assert why in view["reason"], view
        assert cloud.placement.get_allocations(uuid) == {}
        assert cache_files(Path(host.cfg["image_cache_path"])) == []  # no partial file
    finally:
        server.close()

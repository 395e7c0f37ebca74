"""The image cache against a real HTTP server on loopback: download once, check, never leave partial files."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.harness import Served, free_port
from etcd_compute.ecompute import images
from etcd_compute.ecompute.images import ImageError


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
    return sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) if cache.exists() else []


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
    assert first.path.stat().st_mode & 0o777 == 0o644


def test_expected_sha256(served: Served, tmp_path: Path) -> None:
    data = raw_disk()
    url = served.add("disk.raw", data)
    cache = tmp_path / "cache"
    with pytest.raises(ImageError, match="sha256 is"):
        images.fetch(url, cache, sha256="0" * 64)
    assert cache_files(cache) == []
    assert images.fetch(url, cache, sha256=hashlib.sha256(data).hexdigest()).format == "raw"


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
    a = images.fetch(str(src), cache)
    b = images.fetch(f"file://{src}", cache)
    assert a.format == b.format == "raw" and a.path.read_bytes() == src.read_bytes()
    with pytest.raises(ImageError, match="No such file"):
        images.fetch(str(tmp_path / "nope"), cache)
    for ref in ("relative/disk.img", "ftp://example.invalid/x.img"):
        with pytest.raises(ImageError, match="expected an http"):
            images.check_scheme(ref)

"""The image cache: base images fetched once per host, checked, and shared by overlays.

A reference is an http(s) URL, a file:// URL or an absolute local path. Each is
stored once under a name derived from the reference (for local files, also from
their size and mtime, so an edited file is fetched again), written to a temporary
file, checked, and renamed into place: a reader never sees a partial image. A lock
per image makes concurrent builds of the same image download it once.

"Checked" means: it is a qcow2 without a backing file of its own (a backing path
inside a downloaded image would let it read host files), or a raw disk with a
partition table or filesystem we recognise; anything else is refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import struct
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import unquote, urlsplit

import requests

from etcd_compute import contract

LOG = logging.getLogger(__name__)
CHUNK = 1 << 20


class ImageError(Exception):
    """The image cannot be used; the message is the instance's ERROR reason."""


@dataclass(frozen=True)
class Image:
    path: Path
    format: str  # qcow2 | raw
    virtual_size: int  # bytes the guest sees


def check_scheme(ref: str) -> None:
    """Refuse what we cannot fetch (eschedule checked the same fact before claiming)."""
    problem = contract.image_ref_problem(ref)
    if problem:
        raise ImageError(problem)


def probe(path: Path) -> Image:
    """Format and virtual size of a disk image, or ImageError if it is not one we accept."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(34 * 1024)
    if head[:4] == b"QFI\xfb":
        backing_offset, = struct.unpack(">Q", head[8:16])
        if backing_offset:
            raise ImageError("qcow2 image has a backing file of its own; refusing it")
        virtual, = struct.unpack(">Q", head[24:32])
        return Image(path, "qcow2", virtual)
    for magic in (b"KDMV", b"vhdxfile", b"conectix", b"<<< Oracle VM"):
        if head.startswith(magic):
            raise ImageError(f"unsupported image format ({magic.decode(errors='replace')}); use qcow2 or raw")
    recognised = (
        head[510:512] == b"\x55\xaa"  # MBR / boot sector
        or head[512:520] == b"EFI PART"  # GPT
        or head[1080:1082] == b"\x53\xef"  # ext2/3/4 superblock magic
        or head[32769:32774] == b"CD001"  # ISO 9660
    )
    if not recognised or size < 1024:
        raise ImageError("not a disk image (neither qcow2 nor a raw disk with a partition table or filesystem)")
    return Image(path, "raw", size)


def _plain(path: Path) -> Image:
    return Image(path, "raw", path.stat().st_size)


def _cache_name(ref: str) -> str:
    key = ref
    local = _local_path(ref)
    if local is not None:
        try:
            st = local.stat()
        except OSError as exc:
            raise ImageError(f"image {ref}: {exc.strerror}") from None
        key = f"{local}|{st.st_size}|{st.st_mtime_ns}"
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def _local_path(ref: str) -> Path | None:
    url = urlsplit(ref)
    if url.scheme == "file":
        return Path(unquote(url.path))
    if url.scheme == "":
        return Path(ref)
    return None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def fetch(ref: str, cache_dir: str | Path, sha256: str | None = None, kind: str = "disk") -> Image:
    """The cached, checked base image for `ref`, downloading it only if it is not cached.

    kind "file" skips the disk-image check (kernels and initrds for direct boot).
    """
    check = probe if kind == "disk" else _plain
    check_scheme(ref)
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    os.chmod(cache, 0o755)  # QEMU (user libvirt-qemu) reads base images through it
    target = cache / _cache_name(ref)
    with _locked(cache / f".{target.name}.lock"):
        if target.exists():
            LOG.info("image %s: cached as %s", ref, target.name)
            return check(target)
        part = cache / f".{target.name}.part"
        try:
            digest = _copy(ref, part)
            if sha256 and digest != sha256.lower():
                raise ImageError(f"image {ref}: sha256 is {digest}, expected {sha256}")
            image = check(part)
            os.chmod(part, 0o644)
            os.rename(part, target)
        finally:
            part.unlink(missing_ok=True)
    return Image(target, image.format, image.virtual_size)


def _copy(ref: str, dest: Path) -> str:
    """Copy or download `ref` to `dest`; return its sha256."""
    digest = hashlib.sha256()
    local = _local_path(ref)
    started = time.monotonic()
    with dest.open("wb") as out:
        if local is not None:
            try:
                with local.open("rb") as src:
                    while chunk := src.read(CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
            except OSError as exc:
                raise ImageError(f"image {ref}: {exc.strerror}") from None
        else:
            _download(ref, out, digest)
        out.flush()
        os.fsync(out.fileno())
    LOG.info("image %s: %d bytes in %.1fs", ref, dest.stat().st_size, time.monotonic() - started)
    return digest.hexdigest()


def _download(url: str, out: BinaryIO, digest: Any) -> None:
    try:
        with requests.get(url, stream=True, timeout=(10, 60)) as resp:
            if resp.status_code != 200:
                raise ImageError(f"image download failed: HTTP {resp.status_code} for {url}")
            total = int(resp.headers.get("content-length") or 0)
            progress = _Progress(url, total)
            for chunk in resp.iter_content(CHUNK):
                digest.update(chunk)
                out.write(chunk)
                progress.update(len(chunk))
            progress.done()
    except requests.ConnectionError as exc:
        host = urlsplit(url).hostname
        raise ImageError(f"image download failed: cannot reach {host} ({type(exc).__name__})") from None
    except requests.Timeout:
        raise ImageError(f"image download failed: {url} timed out") from None
    except requests.RequestException as exc:
        raise ImageError(f"image download failed: {exc}") from None


class _Progress:
    """A bar when stderr is a terminal; otherwise a log line every 10 seconds."""

    def __init__(self, url: str, total: int) -> None:
        self.url, self.total, self.seen = url, total, 0
        self.tty = sys.stderr.isatty()
        self.last = time.monotonic()
        LOG.info("downloading %s (%s)", url, f"{total >> 20} MiB" if total else "size unknown")

    def update(self, n: int) -> None:
        self.seen += n
        if self.tty and self.total:
            done = self.seen * 30 // self.total
            sys.stderr.write(f"\r[{'#' * done}{'.' * (30 - done)}] {self.seen >> 20}/{self.total >> 20} MiB")
            sys.stderr.flush()
        elif time.monotonic() - self.last > 10:
            self.last = time.monotonic()
            LOG.info("downloading %s: %d MiB so far", self.url, self.seen >> 20)

    def done(self) -> None:
        if self.tty and self.total:
            sys.stderr.write("\n")

"""The image cache: base images fetched once per host, checked, and shared by overlays.

A reference is an http(s) URL, a file:// URL or an absolute local path. Each is
stored once under a name derived from the reference (for local files, also from
their size and mtime, so an edited file is fetched again), written to a temporary
file, checked, and renamed into place: a reader never sees a partial image. A lock
per image makes concurrent builds of the same image download it once.

"Checked" means: it is a qcow2 without a backing file of its own (a backing path
inside a downloaded image would let it read host files), or a raw disk with a
partition table or filesystem we recognise; anything else is refused.

What a user may name is bounded by the host's operator (compute.yaml):
- a local reference (path or file:// URL) must resolve (symlinks and ".." followed)
  into one of `image_dirs` and be a regular file; the cache itself and the instances'
  files never qualify. Nothing else is opened, so no device, FIFO or root-only file
  of the host ends up in the cache or in a guest;
- at most `image_max_bytes` are copied or downloaded;
- a `cancel` marker file (jobs.cancel_marker) that appears stops the fetch.
Each of these aborts with ImageError and removes the partial file. The cache
directory is 0711 and its files 0600: QEMU (libvirt-qemu) only passes through the
directory, and libvirt's dynamic ownership hands the files a domain uses (the
backing chain of its overlay, its kernel and initrd) to that user while it needs them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import stat
import struct
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

from etcd_compute import contract

LOG = logging.getLogger(__name__)
CHUNK = 1 << 20
MAX_BYTES = 20 << 30  # compute.yaml image_max_bytes
LOCK_POLL = 0.2  # seconds between tries of a lock another build holds (watching the cancel marker)


class ImageError(Exception):
    """The image cannot be used; the message is the instance's ERROR reason."""


@dataclass(frozen=True)
class Pace:
    """How slow a fetch may be (compute.yaml's image_download): it must end within `deadline`
    seconds, and after its first `window` seconds bring at least `min_rate` bytes a second
    over the last `window` seconds. A server that drips is given up on, with its rate named."""

    deadline: float = 1800.0
    min_rate: int = 10 << 10
    window: float = 30.0


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


def _cache_name(ref: str, source: _Local | None) -> str:
    key = ref
    if source is not None:  # a local file: an edited one is fetched again
        key = f"{source.path}|{source.stat.st_size}|{source.stat.st_mtime_ns}"
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def _local_path(ref: str) -> Path | None:
    url = urlsplit(ref)
    if url.scheme == "file":
        return Path(unquote(url.path))
    if url.scheme == "":
        return Path(ref)
    return None


@dataclass(frozen=True)
class _Local:
    """A local file the host allows: its real path, the allowed directory it lies in, its stat."""

    path: Path
    root: Path
    stat: os.stat_result


def _local_source(ref: str, path: Path, allowed_dirs: Sequence[str], private_dirs: Sequence[str | Path]) -> _Local:
    """The local file `ref` names, if the host allows it; else ImageError.

    Whether it lies in an allowed directory (symlinks and ".." resolved) is asked before
    anything else, so nothing outside them is looked at (nor its existence revealed);
    then it must be a regular file. Nothing is opened here (opening a device can act).
    """
    try:
        real = Path(os.path.realpath(path))
    except ValueError:  # an embedded NUL
        raise ImageError(f"image {ref!r}: not a valid path") from None
    roots = [Path(os.path.realpath(d)) for d in allowed_dirs]
    root = next((r for r in roots if real.is_relative_to(r)), None)
    if root is None or any(real.is_relative_to(os.path.realpath(d)) for d in private_dirs):
        raise ImageError(f"image {ref}: not in a directory this host allows local images from (image_dirs)")
    try:
        st = real.stat()
    except OSError as exc:
        raise ImageError(f"image {ref}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(f"image {ref}: not a regular file")
    return _Local(real, root, st)


def _cancelled(ref: str, cancel: Path | None) -> Callable[[], None]:
    """A check that raises ImageError once the cancel marker exists."""
    def check() -> None:
        if cancel is not None and cancel.exists():
            raise ImageError(f"image {ref}: fetch stopped, the instance was deleted")
    return check


@contextlib.contextmanager
def _locked(path: Path, check: Callable[[], None]) -> Iterator[None]:
    """The image's lock; while another build holds it (downloading), `check` runs now and then."""
    with path.open("w") as f:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                check()
                time.sleep(LOCK_POLL)
        yield


def fetch(ref: str, cache_dir: str | Path, sha256: str | None = None, kind: str = "disk", *,
          allowed_dirs: Sequence[str] = (), private_dirs: Sequence[str] = (), max_bytes: int = MAX_BYTES,
          cancel: Path | None = None, pace: Pace | None = None) -> Image:
    """The cached, checked base image for `ref`, downloading it only if it is not cached.

    kind "file" skips the disk-image check (kernels and initrds for direct boot).
    Local references only from `allowed_dirs` (none by default), never from the cache
    or `private_dirs`; at most `max_bytes`; stopped once the file `cancel` exists, or once it
    is slower than `pace` allows.
    """
    check = probe if kind == "disk" else _plain
    check_scheme(ref)
    cancelled = _cancelled(ref, cancel)
    cancelled()
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    os.chmod(cache, 0o711)  # QEMU (libvirt-qemu) passes through to the files libvirt hands it; no listing
    local = _local_path(ref)
    source = _local_source(ref, local, allowed_dirs, (cache, *private_dirs)) if local is not None else None
    target = cache / _cache_name(ref, source)
    with _locked(cache / f".{target.name}.lock", cancelled):
        if target.exists():
            LOG.info("image %s: cached as %s", ref, target.name)
            if target.stat().st_mode & 0o077:
                os.chmod(target, 0o600)  # cached by an older version, readable by everyone
            if sha256:  # a pin holds for the cached copy as for a download
                _pinned(ref, _cached_digest(target), sha256)
            return check(target)
        part = cache / f".{target.name}.part"
        try:
            digest = _copy(ref, source, part, _Sink(ref, max_bytes, cancelled, pace))
            if sha256:
                _pinned(ref, digest, sha256)
            image = check(part)
            os.rename(part, target)
            _remember_digest(target, digest)
        finally:
            part.unlink(missing_ok=True)
    return Image(target, image.format, image.virtual_size)


def _pinned(ref: str, digest: str, sha256: str) -> None:
    if digest != sha256.lower():
        raise ImageError(f"image {ref}: sha256 is {digest}, expected {sha256}")


def _stamp(st: os.stat_result) -> list[int]:
    """What changes when a file is rewritten or replaced: its digest is known only while it matches."""
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _remember_digest(path: Path, digest: str) -> None:
    """Beside a cached file: its sha256 and the stat it was taken at (a later pin needs no rehash)."""
    side = path.with_name(f".{path.name}.sha256")
    side.write_text(json.dumps({"sha256": digest, "stat": _stamp(path.stat())}))
    os.chmod(side, 0o600)


def _cached_digest(path: Path) -> str:
    """The sha256 of a cached file: remembered if the file is as it was then, else read anew (an
    older cache, or a file changed behind the cache's back)."""
    try:
        known = json.loads(path.with_name(f".{path.name}.sha256").read_text())
        if known["stat"] == _stamp(path.stat()):
            return str(known["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    _remember_digest(path, digest.hexdigest())
    return digest.hexdigest()


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} bytes"


class _Sink:
    """Where the bytes of a fetch go: counted against the limit, hashed, the cancel marker and
    the pace looked at before each chunk."""

    def __init__(self, ref: str, max_bytes: int, cancelled: Callable[[], None], pace: Pace | None = None) -> None:
        self.ref, self.max_bytes, self.cancelled, self.pace = ref, max_bytes, cancelled, pace or Pace()
        self.digest = hashlib.sha256()
        self.size = 0
        self.out: BinaryIO | None = None
        self.started = time.monotonic()
        self.marks: deque[tuple[float, int]] = deque([(self.started, 0)])  # (when, bytes by then)

    def paced(self) -> None:
        """Raise ImageError once the fetch has run too long, or too slowly over the last window."""
        now, pace = time.monotonic(), self.pace
        if now - self.started > pace.deadline:
            raise ImageError(f"image {self.ref}: fetch did not finish within {pace.deadline:.0f}s "
                             f"(image_download.deadline; {_size(self.size)} so far); aborted")
        while len(self.marks) > 1 and self.marks[1][0] <= now - pace.window:
            self.marks.popleft()  # keep the newest mark at least `window` old
        when, size = self.marks[0]
        if now - when >= pace.window and (self.size - size) / (now - when) < pace.min_rate:
            rate = (self.size - size) / (now - when)
            raise ImageError(f"image {self.ref}: fetch too slow: {rate:.0f} bytes/s over the last "
                             f"{now - when:.0f}s, the minimum is {pace.min_rate} (image_download.min_rate); aborted")
        if now - self.marks[-1][0] >= 0.5:
            self.marks.append((now, self.size))

    def expect(self, total: int) -> None:
        """Refuse at once what announces itself as too big."""
        if total > self.max_bytes:
            self.too_big()

    def too_big(self) -> None:
        raise ImageError(f"image {self.ref}: larger than this host's limit of {_size(self.max_bytes)} "
                         f"(image_max_bytes); fetch aborted")

    def write(self, chunk: bytes) -> None:
        assert self.out is not None
        self.cancelled()
        self.size += len(chunk)
        self.paced()
        if self.size > self.max_bytes:
            self.too_big()
        self.digest.update(chunk)
        self.out.write(chunk)


def _copy(ref: str, source: _Local | None, dest: Path, sink: _Sink) -> str:
    """Copy the checked local `source`, or download `ref`, to `dest` (0600); return its sha256."""
    started = time.monotonic()
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, 0o600)  # a leftover part file may have had another mode
    with os.fdopen(fd, "wb") as out:
        sink.out = out
        if source is not None:
            _copy_local(ref, source, sink)
        else:
            _download(ref, sink)
        out.flush()
        os.fsync(out.fileno())
    LOG.info("image %s: %d bytes in %.1fs", ref, sink.size, time.monotonic() - started)
    return sink.digest.hexdigest()


def _open_beneath(source: _Local) -> int:
    """Open the checked file again from its allowed directory down, following no symlink, so a
    directory swapped for a symlink since the check cannot lead elsewhere (ELOOP/ENOTDIR)."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(source.root, flags | os.O_DIRECTORY)
    try:
        for part in source.path.relative_to(source.root).parts[:-1]:
            parent, fd = fd, os.open(part, flags | os.O_DIRECTORY, dir_fd=fd)
            os.close(parent)
        return os.open(source.path.name, flags | os.O_NONBLOCK | os.O_NOCTTY, dir_fd=fd)
    finally:
        os.close(fd)


def _copy_local(ref: str, source: _Local, sink: _Sink) -> None:
    """Copy the file _local_source checked, if it still is that file."""
    sink.expect(source.stat.st_size)
    try:
        fd = _open_beneath(source)
    except OSError as exc:
        raise ImageError(f"image {ref}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as src:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (source.stat.st_dev, source.stat.st_ino) or not stat.S_ISREG(st.st_mode):
            raise ImageError(f"image {ref}: changed while it was being checked; try again")
        try:
            while chunk := src.read(CHUNK):
                sink.write(chunk)
        except OSError as exc:
            raise ImageError(f"image {ref}: {exc.strerror}") from None


def _download(url: str, sink: _Sink) -> None:
    # Imported here: a worker that only ever copies local images never loads them (~10 MB each).
    import requests
    import urllib3

    try:
        # A read waits at most a pace window: a server that sends nothing is judged as one that drips.
        with requests.get(url, stream=True, timeout=(10, min(60.0, sink.pace.window))) as resp:
            if resp.status_code != 200:
                raise ImageError(f"image download failed: HTTP {resp.status_code} for {url}")
            total = int(resp.headers.get("content-length") or 0)
            sink.expect(total)
            progress = _Progress(url, total)
            # read1: whatever has arrived (up to CHUNK), so the marker and the limit are looked at
            # however slowly the server sends.
            while chunk := resp.raw.read1(CHUNK, decode_content=True):
                sink.write(chunk)
                progress.update(len(chunk))
            progress.done()
    except requests.ConnectionError as exc:
        host = urlsplit(url).hostname
        raise ImageError(f"image download failed: cannot reach {host} ({type(exc).__name__})") from None
    except (requests.Timeout, urllib3.exceptions.TimeoutError):
        raise ImageError(f"image download failed: {url} timed out") from None
    except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
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

"""A small bootable test guest, built offline from Debian packages and cached.

`python3 -m devstack.testguest build [--dir DIR]` writes into DIR (default `<stack>/guest`):
vmlinuz (Debian kernel), initrd.img (busybox + virtio/IDE/ISO modules + /init, a newc cpio written
here), disk.qcow2 (64 MiB ext4 with a marker file) and cmdline. Booted with a direct kernel boot,
/init reports on ttyS0 as `ECTEST key=value` lines: ip, disk_bytes, cd_instance_id, cd_hostname,
md_instance_id, md_ssh_key, then `ECTEST done`. Kernel parameter `ec.md=URL` overrides the
metadata server (default http://169.254.169.254).
"""
from __future__ import annotations

import argparse
import fcntl
import gzip
import hashlib
import io
import json
import logging
import lzma
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from devstack.localstack import stack_dir

LOG = logging.getLogger("testguest")
KERNEL_META = "linux-image-amd64"
BUSYBOX = "busybox-static"
MODULES = ["virtio_pci", "virtio_net", "virtio_blk", "ata_piix", "sr_mod", "isofs"]
DISK_MIB = 64
DISK_MARKER = "etcd-compute-test-disk"
CMDLINE = "console=ttyS0 quiet"
BUILDER_VERSION = "1"  # bump when the build logic (not the inputs) changes

INIT = r"""#!/bin/sh
# etcd-compute test guest: report on the serial console as "ECTEST key=value" lines, then stay up.
/bin/busybox mkdir -p /proc /sys /dev /tmp /mnt/cd
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
/bin/busybox mount -t devtmpfs dev /dev
/bin/busybox --install -s /bin
export PATH=/bin
say() { echo "ECTEST $*"; }
now() { date +%s; }
say boot
for m in $(cat /etc/modules.order); do insmod "/lib/modules/$m.ko" || say "insmod_failed=$m"; done

# Network: DHCP on eth0 (the udhcpc script writes the address to /tmp/ip).
ip link set lo up
IP=none; end=$(( $(now) + 60 ))
while [ "$(now)" -lt "$end" ]; do
  ip link set eth0 up 2>/dev/null
  if udhcpc -i eth0 -s /etc/udhcpc.sh -n -q -t 4 -T 2 >/dev/null 2>&1 && [ -s /tmp/ip ]; then
    IP=$(cat /tmp/ip); break
  fi
  sleep 1
done
say "ip=$IP"

if [ -r /sys/block/vda/size ]; then say "disk_bytes=$(( $(cat /sys/block/vda/size) * 512 ))"
else say disk_bytes=none; fi

# Config drive: NoCloud ISO9660 labelled cidata on the IDE cdrom.
val() { sed -n "s/^$1:[[:space:]]*//p" "$2" | head -n 1 | tr -d "\"'\r"; }
CD_ID=none; CD_HOST=none; i=0
while [ ! -b /dev/sr0 ] && [ $i -lt 5 ]; do sleep 1; i=$((i + 1)); done
# busybox-static has no blkid: the volume label is bytes 40-71 of the primary volume descriptor (sector 16).
LABEL=$(dd if=/dev/sr0 bs=2048 skip=16 count=1 2>/dev/null | dd bs=1 skip=40 count=32 2>/dev/null | tr -d ' \0')
say "cd_label=${LABEL:-none}"
case "$LABEL" in
  cidata|CIDATA)
    if mount -t iso9660 -o ro /dev/sr0 /mnt/cd 2>/dev/null && [ -r /mnt/cd/meta-data ]; then
      CD_ID=$(val instance-id /mnt/cd/meta-data); CD_HOST=$(val local-hostname /mnt/cd/meta-data)
    fi ;;
esac
say "cd_instance_id=${CD_ID:-none}"
say "cd_hostname=${CD_HOST:-none}"

# Metadata server (EC2 paths). busybox 1.35 `wget -T` segfaults: bound each wget with `timeout`.
MD=http://169.254.169.254
for a in $(cat /proc/cmdline); do case "$a" in ec.md=*) MD="${a#ec.md=}" ;; esac; done
host=${MD#*://}; host=${host%%/*}; host=${host%%:*}
case "$host" in 169.254.*) ip route add "$host" dev eth0 2>/dev/null ;; esac
get() { rm -f /tmp/md; timeout 5 wget -q -O /tmp/md "$MD$1" 2>/dev/null && head -n 1 /tmp/md; }
MD_ID=none; KEY=none; end=$(( $(now) + 90 ))
while [ "$IP" != none ]; do
  if v=$(get /latest/meta-data/instance-id); then
    MD_ID=${v:-none}; KEY=$(get /latest/meta-data/public-keys/0/openssh-key) || KEY=none; break
  fi
  [ "$(now)" -ge "$end" ] && break
  sleep 2
done
say "md_instance_id=$MD_ID"
say "md_ssh_key=${KEY:-none}"
say done
while :; do sleep 3600; done
"""

UDHCPC_SCRIPT = r"""#!/bin/sh
# udhcpc event script: configure the lease on $interface and note the address in /tmp/ip.
case "$1" in
  deconfig) ip addr flush dev "$interface"; ip link set "$interface" up ;;
  bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    if [ -n "$router" ]; then ip route replace default via "${router%% *}" dev "$interface"; fi
    echo "$ip" > /tmp/ip ;;
esac
exit 0
"""


def parse_report(console: str) -> dict[str, str] | None:
    """The `ECTEST key=value` lines of INIT's console output, or None until it printed `ECTEST done`."""
    return dict(re.findall(r"ECTEST (\w+)=([^\r\n]*)", console)) if "ECTEST done" in console else None


def run(*cmd: str | Path, cwd: Path | None = None) -> str:
    """Run a build-time tool; raise with its stderr on failure."""
    p = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({p.returncode}): {p.stderr.strip()[-800:]}")
    return p.stdout


_apt_updated = False


def apt(*cmd: str, cwd: Path | None = None) -> str:
    """apt-get/apt-cache; on failure run `apt-get update` once (missing lists) and retry."""
    global _apt_updated
    try:
        return run(*cmd, cwd=cwd)
    except RuntimeError:
        if _apt_updated:
            raise
        LOG.info("apt failed, running apt-get update once")
        run("apt-get", "update")
        _apt_updated = True
        return run(*cmd, cwd=cwd)


def resolve_packages() -> tuple[str, str, str]:
    """(kernel package behind linux-image-amd64, its version, busybox-static version).

    One `apt-cache show` (~0.7 s here: apt keeps no binary cache) instead of depends + policy.
    """
    out = apt("apt-cache", "show", "--no-all-versions", KERNEL_META, BUSYBOX)
    stanzas = {m["pkg"]: m["body"] for m in re.finditer(r"^Package: (?P<pkg>\S+)\n(?P<body>(?:.+\n?)*)", out, re.M)}
    dep = re.search(r"^Depends: (linux-image-[^\s,]+)(?: \(= ([^)]+)\))?", stanzas.get(KERNEL_META, ""), re.M)
    bver = re.search(r"^Version: (\S+)", stanzas.get(BUSYBOX, ""), re.M)
    if not dep or not bver:
        raise RuntimeError(f"cannot resolve {KERNEL_META} / {BUSYBOX} from apt-cache: {out[:400]!r}")
    kver = dep[2]
    if not kver:
        found = re.search(r"^Version: (\S+)", apt("apt-cache", "show", "--no-all-versions", dep[1]), re.M)
        if not found:
            raise RuntimeError(f"cannot find the version of {dep[1]} in apt-cache")
        kver = found[1]
    return dep[1], kver, bver[1]


def quote(version: str) -> str:
    """A version as apt-get download spells it in file names (epoch colon -> %3a)."""
    return version.replace(":", "%3a")


def unpack(pkg: str, version: str, cache: Path, into: Path) -> None:
    """apt-get download PKG=VERSION into the cache (kept) and dpkg-deb -x it into INTO."""
    deb = next(cache.glob(f"{pkg}_{quote(version)}_*.deb"), None)
    if deb is None:
        print(f"  downloading {pkg}={version}", flush=True)
        apt("apt-get", "download", "-o", "APT::Sandbox::User=root", f"{pkg}={version}", cwd=cache)
        deb = next(cache.glob(f"{pkg}_{quote(version)}_*.deb"))
    run("dpkg-deb", "-x", deb, into)


def module_closure(moddir: Path, wanted: list[str]) -> list[tuple[str, Path]]:
    """(name, file) for WANTED and their dependencies, dependencies first.

    The package ships no modules.dep (depmod runs at install), so each module's own
    `depends=` entry from its .modinfo section is used instead.
    """
    index = {re.sub(r"\.ko(\.xz|\.gz)?$", "", p.name).replace("-", "_"): p
             for p in moddir.rglob("*.ko*")}
    order: list[tuple[str, Path]] = []

    def visit(name: str) -> None:
        if any(n == name for n, _ in order):
            return
        path = index.get(name)
        if path is None:
            raise RuntimeError(f"module {name} not found under {moddir}")
        m = re.search(rb"(?:^|\0)depends=([^\0]*)\0", read_module(path))
        for dep in (m.group(1).decode().split(",") if m else []):
            if dep:
                visit(dep.replace("-", "_"))
        order.append((name, path))

    for name in wanted:
        visit(name)
    return order


def read_module(path: Path) -> bytes:
    """A module's bytes, decompressed (busybox insmod cannot load .ko.xz/.ko.gz)."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    return data


def newc(entries: list[tuple[str, int, bytes, int]]) -> bytes:
    """A newc cpio archive of (name, mode, data, rdev) entries; rdev is (major << 8) | minor."""
    out = io.BytesIO()
    for ino, (name, mode, data, rdev) in enumerate([*entries, ("TRAILER!!!", 0, b"", 0)], 1):
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev >> 8, rdev & 0xFF, len(name) + 1, 0]
        out.write(b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0")
        out.write(b"\0" * (-out.tell() % 4))
        out.write(data)
        out.write(b"\0" * (-out.tell() % 4))
    return out.getvalue()


def build_initrd(modules: list[tuple[str, bytes]], busybox: bytes, dest: Path) -> None:
    dirs = ["bin", "dev", "etc", "lib", "lib/modules", "mnt", "proc", "sys", "tmp"]
    entries = [(d, 0o40755, b"", 0) for d in dirs]
    entries += [("dev/console", 0o20600, b"", (5 << 8) | 1),  # init's stdio, before devtmpfs is mounted
                ("bin/busybox", 0o100755, busybox, 0), ("bin/sh", 0o120777, b"busybox", 0),
                ("init", 0o100755, INIT.encode(), 0), ("etc/udhcpc.sh", 0o100755, UDHCPC_SCRIPT.encode(), 0),
                ("etc/modules.order", 0o100644, "".join(f"{n}\n" for n, _ in modules).encode(), 0)]
    entries += [(f"lib/modules/{n}.ko", 0o100644, data, 0) for n, data in modules]
    write_atomic(dest, gzip.compress(newc(entries), compresslevel=9, mtime=0))


def build_disk(dest: Path, tmp: Path) -> None:
    """64 MiB ext4 (mke2fs -d) holding the marker file, converted to qcow2."""
    (tmp / "root").mkdir()
    (tmp / "root" / DISK_MARKER).write_text("etcd-compute test disk\n")
    raw = tmp / "disk.raw"
    with raw.open("wb") as f:
        f.truncate(DISK_MIB << 20)
    run("mke2fs", "-q", "-F", "-t", "ext4", "-L", "ectest", "-d", tmp / "root", raw)
    run("qemu-img", "convert", "-O", "qcow2", raw, tmp / "disk.qcow2")
    os.chmod(tmp / "disk.qcow2", 0o644)
    os.replace(tmp / "disk.qcow2", dest)


def write_atomic(dest: Path, data: bytes | str) -> None:
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, dest)


def ensure_guest(dir: Path | None = None) -> dict:
    """Build whatever is missing or stale in DIR; return kernel/initrd/disk paths and the cmdline."""
    out = Path(dir or stack_dir() / "guest").resolve()
    cache = out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    for d in (out, cache):
        os.chmod(d, 0o755)  # QEMU runs as libvirt-qemu: it must reach the files
    with (cache / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        kpkg, kver, bver = resolve_packages()
        h = hashlib.sha256
        keys = {
            "vmlinuz": f"{kpkg}={kver}",
            "initrd.img": h(json.dumps([BUILDER_VERSION, kpkg, kver, bver, MODULES, INIT, UDHCPC_SCRIPT])
                            .encode()).hexdigest()[:16],
            "disk.qcow2": f"{BUILDER_VERSION}:{DISK_MIB}MiB:{DISK_MARKER}",
            "cmdline": CMDLINE,
        }
        state_file = out / "build.json"
        state = json.loads(state_file.read_text()) if state_file.exists() else {}
        stale = [n for n, k in keys.items() if state.get(n) != k or not (out / n).exists()]
        if not stale:
            return result(out)
        t0 = time.monotonic()
        print(f"testguest: building {', '.join(stale)} in {out}", flush=True)

        def built(name: str) -> None:
            state[name] = keys[name]
            write_atomic(state_file, json.dumps(state, indent=1) + "\n")

        with tempfile.TemporaryDirectory(dir=cache) as tmpname:
            tmp = Path(tmpname)
            if "vmlinuz" in stale or "initrd.img" in stale:
                unpack(kpkg, kver, cache, tmp / "k")
                release = kpkg.removeprefix("linux-image-")
                if "vmlinuz" in stale:
                    write_atomic(out / "vmlinuz", (tmp / "k" / "boot" / f"vmlinuz-{release}").read_bytes())
                    built("vmlinuz")
                if "initrd.img" in stale:
                    unpack(BUSYBOX, bver, cache, tmp / "bb")
                    mods = module_closure(tmp / "k" / "lib" / "modules" / release, MODULES)
                    print(f"  modules: {' '.join(n for n, _ in mods)}", flush=True)
                    build_initrd([(n, read_module(p)) for n, p in mods],
                                 (tmp / "bb" / "bin" / "busybox").read_bytes(), out / "initrd.img")
                    built("initrd.img")
            if "disk.qcow2" in stale:
                build_disk(out / "disk.qcow2", tmp)
                built("disk.qcow2")
            if "cmdline" in stale:
                write_atomic(out / "cmdline", CMDLINE + "\n")
                built("cmdline")
        for deb in cache.glob("*.deb"):  # drop debs of superseded versions
            if not deb.name.startswith((f"{kpkg}_{quote(kver)}_", f"{BUSYBOX}_{quote(bver)}_")):
                deb.unlink()
        print(f"testguest: built in {time.monotonic() - t0:.1f}s "
              f"(initrd.img {(out / 'initrd.img').stat().st_size / 1e6:.2f} MB)", flush=True)
    return result(out)


def result(out: Path) -> dict:
    """The ensure_guest() answer for output dir OUT."""
    return {"kernel": str(out / "vmlinuz"), "initrd": str(out / "initrd.img"),
            "disk": str(out / "disk.qcow2"), "cmdline": CMDLINE}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m devstack.testguest", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build", help="build (or reuse) the guest files").add_argument(
        "--dir", type=Path, help="output dir (default: $ECOMPUTE_STACK_DIR/guest or <repo>/.stack/guest)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="testguest: %(message)s")
    try:
        print(json.dumps(ensure_guest(args.dir), indent=1))
    except (RuntimeError, OSError) as e:
        print(f"testguest: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

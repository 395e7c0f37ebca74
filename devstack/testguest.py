"""A small bootable test guest, built offline from Debian packages and cached.

`python3 -m devstack.testguest build [--dir DIR]` writes into DIR (default `<stack>/guest`):
vmlinuz (Debian kernel), initrd.img (busybox + virtio/IDE/ISO modules + /init, a newc cpio written
here), disk.qcow2 (64 MiB ext4 with a marker file) and cmdline. Booted with a direct kernel boot,
/init reports on ttyS0 as `ECTEST key=value` lines: dmi_sys_vendor, dmi_product_name,
dmi_product_serial, disk_bytes, ip, cd_label, cd_instance_id, cd_hostname,
md_instance_id, md_ssh_key, then `ECTEST done`. `ec.spoof=ADDR` makes it take ADDR after DHCP
(spoofed=ADDR). The ACPI power button (`eschedule stop`, `reboot`) powers it off at once
(busybox's acpid; `ECTEST power_button`). Once done it tells the metadata server it has booted
(POST /etcd-compute/ready/<uuid>: `--wait=ready`). `ec.panic` makes its kernel panic once it is done
(pvpanic tells the host). Kernel parameter `ec.md=URL` overrides the
metadata server (default http://169.254.169.254). `ec.stamp=WORD` makes it write to its disk
(stamp_was=, stamp=, beat=N: see INIT); `ec.volume=WORD` to each volume hot-plugged as vdb
(volume_waiting=, volume_serial=, volume_was=, volume=, volume_gone=: see INIT); `ec.ddwrite=MIB`
overwrites its disk with MIB MiB of O_DIRECT writes and says how long that took (ddwrite_us=,
ddwrite_mib=: bench/storage.py's guest write throughput).

`python3 -m devstack.testguest build --cloud [--dir DIR]` builds the second guest into DIR (default
`<stack>/cloudguest`): a real Debian 12 with cloud-init, systemd, ifupdown and sshd (debootstrap from
Debian packages, ~3 min; see ensure_cloud_guest), for tests that need what real guests do.
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
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from devstack.localstack import stack_dir

LOG = logging.getLogger("testguest")
KERNEL_META = "linux-image-amd64"
BUSYBOX = "busybox-static"
# button + evdev: the ACPI power button as an input event, for busybox's acpid (a clean `stop`);
# pvpanic_mmio: a kernel panic is told to the host (the domain's pvpanic device).
MODULES = ["virtio_pci", "virtio_net", "virtio_blk", "ata_piix", "sr_mod", "isofs", "button", "evdev",
           "pvpanic_mmio"]
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
# The ACPI power button (`eschedule stop`, `reboot`) powers the guest off at once: busybox's acpid
# runs /etc/acpi/PWRF/00000080 on it. (Running as PID 1, this script ignores the plain `poweroff`'s signal.)
acpid -c /etc/acpi -l /tmp/acpid.log -p /tmp/acpid.pid || say acpid_failed

# What the domain's SMBIOS data says this machine is (cloud-init's ds-identify reads the same).
for f in sys_vendor product_name product_serial; do say "dmi_$f=$(cat /sys/class/dmi/id/$f 2>/dev/null)"; done
if [ -r /sys/block/vda/size ]; then say "disk_bytes=$(( $(cat /sys/block/vda/size) * 512 ))"
else say disk_bytes=none; fi
# ec.stamp=WORD (tests of disks that outlive their host): say what the first sector of vda held
# (stamp_was=...), write "ECSTAMP WORD" there, then a counter to the second sector every second
# (beat=N once it is on the disk: a guest whose disk I/O stopped says no more). Both sectors are in
# ext4's unused boot block. Before the network: its DHCP waits a minute on a guest without a NIC.
STAMP=
for a in $(cat /proc/cmdline); do case "$a" in ec.stamp=*) STAMP="${a#ec.stamp=}" ;; esac; done
if [ -n "$STAMP" ] && [ -b /dev/vda ]; then
  say "stamp_was=$(dd if=/dev/vda bs=512 count=1 2>/dev/null | tr -d '\0' | sed -n 's/^ECSTAMP //p')"
  printf 'ECSTAMP %s\n' "$STAMP" | dd of=/dev/vda bs=512 count=1 conv=sync,notrunc,fsync 2>/dev/null \
    && say "stamp=$STAMP"
  ( n=0; while :; do n=$((n + 1))
      printf 'ECBEAT %s\n' "$n" | dd of=/dev/vda bs=512 seek=1 count=1 conv=sync,notrunc,fsync 2>/dev/null \
        && say "beat=$n"
      sleep 1; done ) &
fi
# ec.volume=WORD (tests of volumes): wait for a hot-plugged /dev/vdb, say its serial and what its
# first sector held (volume_was=...), write "ECVOLUME WORD" there (volume=WORD), say when it is
# gone (volume_gone=1), and wait for the next. Before the network, as the stamp is.
VOLUME=
for a in $(cat /proc/cmdline); do case "$a" in ec.volume=*) VOLUME="${a#ec.volume=}" ;; esac; done
if [ -n "$VOLUME" ]; then
  ( say volume_waiting=1
    while :; do
      while [ ! -b /dev/vdb ]; do sleep 1; done
      say "volume_serial=$(cat /sys/block/vdb/serial 2>/dev/null)"
      say "volume_was=$(dd if=/dev/vdb bs=512 count=1 2>/dev/null | tr -d '\0' | sed -n 's/^ECVOLUME //p')"
      printf 'ECVOLUME %s\n' "$VOLUME" | dd of=/dev/vdb bs=512 count=1 conv=sync,notrunc,fsync 2>/dev/null \
        && say "volume=$VOLUME"
      while [ -b /dev/vdb ]; do sleep 1; done
      say volume_gone=1
    done ) &
fi

# ec.ddwrite=MIB (bench/storage.py): overwrite the first MIB MiB of vda with a random pattern, 4 MiB
# writes with O_DIRECT, one at a time (dd's), and say how long that took: ddwrite_us= (microseconds,
# from /proc/timer_list's clock: busybox date has no %N; else /proc/uptime's hundredths), then
# ddwrite_mib= (what was written). The 32 MiB pattern is made in memory first, untimed. It destroys
# the disk's filesystem: only for guests nothing reads again. Before the network, as the stamp is.
DDWRITE=
for a in $(cat /proc/cmdline); do case "$a" in ec.ddwrite=*) DDWRITE="${a#ec.ddwrite=}" ;; esac; done
if [ -n "$DDWRITE" ] && [ -b /dev/vda ]; then
  us() { n=$(sed -n '/^now at /{s/^now at \([0-9]*\) nsecs.*/\1/p;q}' /proc/timer_list 2>/dev/null)
    if [ -n "$n" ]; then echo $((n / 1000))
    else read -r up _ < /proc/uptime; echo $(( (${up%.*} * 100 + 1${up#*.} - 100) * 10000 )); fi; }
  dd if=/dev/urandom of=/tmp/pattern bs=1M count=32 2>/dev/null
  written=0; t0=$(us)
  while [ $written -lt "$DDWRITE" ]; do
    dd if=/tmp/pattern of=/dev/vda bs=4M seek=$((written / 4)) oflag=direct conv=notrunc 2>/tmp/dd.err \
      || { say "ddwrite_failed=$(tail -n 1 /tmp/dd.err)"; break; }
    written=$((written + 32))
  done
  t1=$(us); rm -f /tmp/pattern
  say "ddwrite_us=$((t1 - t0))"
  say "ddwrite_mib=$written"
fi

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
# ec.spoof=ADDR (tests only): after DHCP, use ADDR instead, as a guest stealing another's address would.
SPOOF=
for a in $(cat /proc/cmdline); do case "$a" in ec.spoof=*) SPOOF="${a#ec.spoof=}" ;; esac; done
if [ -n "$SPOOF" ] && [ "$IP" != none ]; then
  ip addr flush dev eth0 && ip addr add "$SPOOF/24" dev eth0 && IP=$SPOOF && say "spoofed=$SPOOF"
fi

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
MD_ID=none; KEY=none; end=$(( $(now) + 90 )); [ -n "$SPOOF" ] && end=$(( $(now) + 20 ))
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
# ec.panic (tests only): then crash the kernel, as a guest that panics while it boots does.
case " $(cat /proc/cmdline) " in *" ec.panic "*) say panicking; echo c > /proc/sysrq-trigger ;; esac
# Tell the host this boot has finished (what cloud-init guests do through the host's vendor-data).
if [ "$MD_ID" != none ]; then
  timeout 10 wget -q -O /dev/null --post-data=ready "$MD/etcd-compute/ready/$MD_ID" && say ready_posted
fi
while :; do sleep 3600; done
"""

POWER_BUTTON = r"""#!/bin/sh
# busybox acpid: the ACPI power button was pressed. Nothing here needs stopping: flush and power off.
echo "ECTEST power_button" > /dev/console
sync
poweroff -f
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
    dirs = ["bin", "dev", "etc", "etc/acpi", "etc/acpi/PWRF", "lib", "lib/modules", "mnt", "proc", "sys", "tmp"]
    entries = [(d, 0o40755, b"", 0) for d in dirs]
    entries += [("dev/console", 0o20600, b"", (5 << 8) | 1),  # init's stdio, before devtmpfs is mounted
                ("bin/busybox", 0o100755, busybox, 0), ("bin/sh", 0o120777, b"busybox", 0),
                ("init", 0o100755, INIT.encode(), 0), ("etc/udhcpc.sh", 0o100755, UDHCPC_SCRIPT.encode(), 0),
                ("etc/acpi/PWRF/00000080", 0o100755, POWER_BUTTON.encode(), 0),
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
            "initrd.img": h(json.dumps([BUILDER_VERSION, kpkg, kver, bver, MODULES, INIT, UDHCPC_SCRIPT, POWER_BUTTON])
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


# ---------------------------------------------------------------- the Debian cloud-init guest

CLOUD_SUITE = "bookworm"
CLOUD_MIRROR = "http://deb.debian.org/debian"  # $ECOMPUTE_DEBIAN_MIRROR overrides it (not part of the recipe)
CLOUD_PACKAGES = [
    "systemd-sysv", "udev", "libpam-systemd",
    "dbus",  # minbase lacks it; without it logind cannot handle the ACPI power button
    "ifupdown", "isc-dhcp-client", "openssh-server",
    "sudo",  # the default user's sudo rule is useless without it (a Recommends, which debootstrap skips)
    "locales",  # without it cloud-init's status is error
    "e2fsprogs",  # resize2fs, for cloud-init's resizefs when the overlay is grown
    "cloud-init",
    # debootstrap resolves no virtual packages: python3-cryptography (cloud-init -> oauthlib) needs
    # python3-cffi-backend-api-*, which only this package provides.
    "python3-cffi-backend",
    "linux-image-cloud-amd64",
]
CLOUD_USER = "debian"  # default_user in the cloud.cfg of Debian's cloud-init; NoCloud's ssh keys go to it
CLOUD_CMDLINE = "root=/dev/vda console=ttyS0 rw"
CLOUD_DISK_MIB = 2048  # the ext4 the guest sees; the qcow2 holds only what is used
CLOUD_BUILDER_VERSION = "1"  # bump when the build logic (not the recipe below) changes
CLOUD_FILES = {
    "etc/cloud/cloud.cfg.d/90_etcd_compute.cfg": """\
# etcd-compute test guest.
# Only the sources etcd-compute provides: ds-identify decides at once instead of probing every cloud.
datasource_list: [NoCloud, ConfigDrive, OpenStack, None]
# RSA host keys take seconds to generate under TCG; sshd needs one type.
ssh_genkeytypes: [ed25519, ecdsa]
# The instance's hostname resolves without DNS (sudo looks it up).
manage_etc_hosts: localhost
# No bootloader here: the kernel is booted directly.
grub_dpkg: {enabled: false}
""",
    # C.UTF-8 is built into libc: cloud-init's locale module finds it set and runs no locale-gen at boot.
    "etc/default/locale": "LANG=C.UTF-8\n",
    "etc/network/interfaces": "# cloud-init writes this instance's interfaces to interfaces.d/50-cloud-init\n"
                              "source /etc/network/interfaces.d/*\n",
    "etc/fstab": "/dev/vda / ext4 rw,errors=remount-ro 0 1\n",
    "etc/hostname": "localhost\n",
    "etc/hosts": "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n",
    "etc/resolv.conf": "",  # dhclient writes it; debootstrap copied the build host's
    "etc/machine-id": "",  # empty: systemd makes one per instance at first boot
    # Host keys are made per instance by cloud-init (ordered before sshd); should it not run, sshd
    # makes its own instead of failing `sshd -t`.
    "etc/systemd/system/ssh.service.d/10-hostkeys.conf": """\
[Service]
ExecStartPre=
ExecStartPre=/bin/sh -c 'ls /etc/ssh/ssh_host_*_key >/dev/null 2>&1 || ssh-keygen -A'
ExecStartPre=/usr/sbin/sshd -t
""",
    # An empty machine-id means first boot, when systemd enables what the presets say: not networkd
    # beside ifupdown.
    "etc/systemd/system-preset/10-etcd-compute.preset": "disable systemd-networkd.service\n"
                                                          "disable systemd-network-generator.service\n",
}
CLOUD_LINKS = {
    "var/lib/dbus/machine-id": "/etc/machine-id",  # debootstrap left a copy, shared by all instances
    # Its first-boot run can prompt on the console (no /etc/locale.conf here) and stall the boot;
    # cloud-init does the first-boot configuration.
    "etc/systemd/system/systemd-firstboot.service": "/dev/null",
}
CLOUD_REMOVE = ["etc/ssh/ssh_host_*", "var/cache/apt/archives/*.deb", "var/lib/apt/lists/*_*",
                "var/log/*.log", "var/lib/systemd/random-seed", "run/*", "tmp/*", "debootstrap"]
BUILD_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
UNSAFE_IO = "etc/dpkg/dpkg.cfg.d/zz-etcd-compute-build"  # build only: dpkg skips fsync


def cloud_recipe() -> str:
    """The recipe's hash: a change to any of it rebuilds, a new package version alone does not."""
    recipe = [CLOUD_BUILDER_VERSION, CLOUD_SUITE, "minbase", CLOUD_PACKAGES, CLOUD_FILES, CLOUD_LINKS,
              CLOUD_REMOVE, CLOUD_DISK_MIB, CLOUD_CMDLINE]
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def cloud_dir(dir: Path | None) -> Path:
    return Path(dir or stack_dir() / "cloudguest").resolve()


def cloud_result(image: Path) -> dict:
    """The ensure_cloud_guest() answer: ensure_guest()'s keys plus the user that takes the ssh keys."""
    return {"kernel": str(image / "vmlinuz"), "initrd": str(image / "initrd.img"),
            "disk": str(image / "disk.qcow2"), "cmdline": CLOUD_CMDLINE, "user": CLOUD_USER}


def cloud_stamp(image: Path) -> str | None:
    """The recipe hash the build in IMAGE was made from, or None if it is missing or incomplete."""
    names = ("vmlinuz", "initrd.img", "disk.qcow2", "cmdline", "build.json")
    if not all((image / n).is_file() for n in names):
        return None
    try:
        return str(json.loads((image / "build.json").read_text())["recipe"])
    except (ValueError, KeyError, TypeError):
        return None


def cloud_guest_ready(dir: Path | None = None) -> dict | None:
    """ensure_cloud_guest()'s answer if the current recipe is built already, else None (builds nothing)."""
    image = cloud_dir(dir) / "image"
    return cloud_result(image) if cloud_stamp(image) == cloud_recipe() else None


def ensure_cloud_guest(dir: Path | None = None) -> dict:
    """Build the Debian 12 cloud-init guest unless the current recipe is built; return its files.

    DIR (default `<stack>/cloudguest`) holds `image/` (vmlinuz, initrd.img, disk.qcow2, cmdline and
    build.json, the stamp: recipe hash, package versions, step times), `debs/` (debootstrap's package
    cache, so a rebuild downloads only what changed), `build.log` (the last build's tool output) and
    `lock`. A build runs in DIR/tmp-*/ (rootfs in /dev/shm when it has room) and replaces `image/` in
    one rename, under the lock: a second caller waits and then finds it built.
    """
    out = cloud_dir(dir)
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o755)  # QEMU runs as libvirt-qemu: it must reach the files
    image = out / "image"
    with (out / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        recipe = cloud_recipe()
        if cloud_stamp(image) == recipe:
            return cloud_result(image)
        if os.geteuid() != 0:
            raise RuntimeError("building the cloud guest needs root (debootstrap, chroot)")
        missing = [pkg for tool, pkg in (("debootstrap", "debootstrap"), ("mke2fs", "e2fsprogs"),
                                         ("qemu-img", "qemu-utils")) if not shutil.which(tool, path=BUILD_PATH)]
        if missing:
            print(f"cloudguest: installing {' '.join(missing)}", flush=True)
            apt("apt-get", "install", "-y", "--no-install-recommends", *missing)
        for stale in out.glob("tmp-*"):  # a killed build's
            remove_tree(stale)
        work = Path(tempfile.mkdtemp(prefix="tmp-", dir=out))
        scratch = scratch_dir(out, work)
        t0 = time.monotonic()
        print(f"cloudguest: building {CLOUD_SUITE} (recipe {recipe}) in {out}, rootfs in {scratch}", flush=True)
        try:
            kept = build_cloud_image(work / "image", scratch, out, recipe)
            if image.exists():
                os.rename(image, work / "old")  # removed with WORK
            os.rename(work / "image", image)
        finally:
            remove_tree(scratch)
            remove_tree(work)
        if kept:  # drop superseded debs from the cache
            for deb in (out / "debs").glob("*.deb"):
                if deb.name not in kept:
                    deb.unlink()
        print(f"cloudguest: built in {time.monotonic() - t0:.0f}s "
              f"(disk.qcow2 {(image / 'disk.qcow2').stat().st_size / 1e6:.0f} MB)", flush=True)
    return cloud_result(image)


def scratch_dir(out: Path, work: Path) -> Path:
    """Where the rootfs is assembled: tmpfs when there is room (dpkg's many small writes), else WORK."""
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free >= 3 << 30:
        path = shm / f"ec-cloudguest-{hashlib.sha256(str(out).encode()).hexdigest()[:8]}"
        remove_tree(path)  # a killed build's (we hold the lock)
        path.mkdir(mode=0o700)
        return path
    return work / "scratch"


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below PATH, deepest first (a killed debootstrap leaves /proc, /sys mounted)."""
    prefix = str(path.resolve())
    points = [line.split()[1].replace("\\040", " ") for line in Path("/proc/self/mounts").read_text().splitlines()]
    return sorted((p for p in points if p == prefix or p.startswith(prefix + "/")), key=len, reverse=True)


def remove_tree(path: Path) -> None:
    """rmtree that first unmounts what is mounted inside, so it never deletes through a mount."""
    if not path.exists() and not path.is_symlink():
        return
    for point in mounts_under(path):
        subprocess.run(["umount", "-l", point], capture_output=True)
    if mounts_under(path):
        raise RuntimeError(f"cannot unmount what is mounted under {path}: {mounts_under(path)}")
    shutil.rmtree(path)


def build_env() -> dict[str, str]:
    """A plain environment for the build tools: no venv, PYTHONPATH or locale of the caller in the chroot."""
    env = {k: v for k, v in os.environ.items() if k.lower() in ("http_proxy", "https_proxy", "no_proxy")}
    env.update(PATH=BUILD_PATH, HOME="/root", LC_ALL="C", DEBIAN_FRONTEND="noninteractive")
    return env


def build_cloud_image(dest: Path, scratch: Path, out: Path, recipe: str) -> set[str]:
    """debootstrap into SCRATCH/root, apply the recipe, write DEST; return the names of the debs used."""
    root, debs, log_path = scratch / "root", out / "debs", out / "build.log"
    debs.mkdir(exist_ok=True)
    mirror = os.environ.get("ECOMPUTE_DEBIAN_MIRROR") or CLOUD_MIRROR
    steps: dict[str, float] = {}
    with log_path.open("w") as log:
        def step(name: str, *cmd: str | Path) -> None:
            t = time.monotonic()
            print(f"cloudguest: {name}", flush=True)
            log.write(f"### {name}: {' '.join(map(str, cmd))}\n")
            log.flush()
            p = subprocess.run([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT, env=build_env())
            steps[name] = round(time.monotonic() - t, 1)
            if p.returncode:
                detail = root / "debootstrap" / "debootstrap.log"
                raise RuntimeError(f"cloud guest: {name} failed ({p.returncode}); {log_path}:\n"
                                   + tail_of(log_path) + (f"\n{detail}:\n{tail_of(detail)}" if detail.exists() else ""))

        # Two stages, so dpkg runs the second without fsync (it matters when SCRATCH is on disk).
        step("debootstrap (download, unpack)", "debootstrap", "--foreign", "--variant=minbase",
             f"--cache-dir={debs}", f"--include={','.join(CLOUD_PACKAGES)}", CLOUD_SUITE, root, mirror)
        (root / UNSAFE_IO).write_text("force-unsafe-io\n")
        step("debootstrap (install, configure)", "chroot", root, "/debootstrap/debootstrap", "--second-stage")
        if mounts_under(root):
            raise RuntimeError(f"debootstrap left mounts in the rootfs: {mounts_under(root)}")
        (root / UNSAFE_IO).unlink()
        kept = {p.name for p in (root / "var" / "cache" / "apt" / "archives").glob("*.deb")}
        apply_recipe(root)
        kernels, initrds = sorted((root / "boot").glob("vmlinuz-*")), sorted((root / "boot").glob("initrd.img-*"))
        if len(kernels) != 1 or len(initrds) != 1:
            raise RuntimeError(f"expected one kernel and one initrd in the rootfs, found {kernels} {initrds}")
        release = kernels[0].name.removeprefix("vmlinuz-")
        dest.mkdir()
        shutil.copyfile(kernels[0], dest / "vmlinuz")
        shutil.copyfile(initrds[0], dest / "initrd.img")
        raw = scratch / "disk.raw"
        with raw.open("wb") as f:
            f.truncate(CLOUD_DISK_MIB << 20)
        step("mke2fs -d", "mke2fs", "-q", "-F", "-t", "ext4", "-L", "root", "-d", root, raw)
        # zstd: smaller and several times faster than zlib; QEMU reads it since 5.1.
        step("qemu-img convert", "qemu-img", "convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd",
             raw, dest / "disk.qcow2")
    (dest / "cmdline").write_text(CLOUD_CMDLINE + "\n")
    stamp = {"recipe": recipe, "suite": CLOUD_SUITE, "mirror": mirror, "kernel": release,
             "packages": dpkg_versions(root, {"cloud-init", "systemd", "openssh-server", "ifupdown",
                                              "linux-image-cloud-amd64", f"linux-image-{release}"}),
             "seconds": steps, "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (dest / "build.json").write_text(json.dumps(stamp, indent=1) + "\n")
    for file in dest.iterdir():
        os.chmod(file, 0o644)
    os.chmod(dest, 0o755)
    return kept


def apply_recipe(root: Path) -> None:
    """CLOUD_FILES, CLOUD_LINKS and CLOUD_REMOVE, inside ROOT (never through a symlink out of it)."""
    for rel, text in CLOUD_FILES.items():
        path = root / rel
        if path.is_symlink():
            path.unlink()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        os.chmod(path, 0o644)
    for rel, target in CLOUD_LINKS.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            path.unlink()
        path.symlink_to(target)
    for pattern in CLOUD_REMOVE:
        for path in root.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()


def dpkg_versions(root: Path, names: set[str]) -> dict[str, str]:
    """Installed versions of NAMES, read from ROOT's dpkg status (recorded in the stamp, not hashed)."""
    found = {}
    for stanza in (root / "var" / "lib" / "dpkg" / "status").read_text().split("\n\n"):
        pkg, ver = re.search(r"^Package: (\S+)$", stanza, re.M), re.search(r"^Version: (\S+)$", stanza, re.M)
        if pkg and ver and pkg[1] in names:
            found[pkg[1]] = ver[1]
    return dict(sorted(found.items()))


def tail_of(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"({e})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m devstack.testguest", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    build = sub.add_parser("build", help="build (or reuse) the guest files")
    build.add_argument("--dir", type=Path, help="output dir (default: $ECOMPUTE_STACK_DIR/guest, or .../cloudguest "
                                                "with --cloud; else under <repo>/.stack)")
    build.add_argument("--cloud", action="store_true", help="the Debian cloud-init guest (debootstrap, minutes)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="testguest: %(message)s")
    try:
        print(json.dumps((ensure_cloud_guest if args.cloud else ensure_guest)(args.dir), indent=1))
    except (RuntimeError, OSError) as e:
        print(f"testguest: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

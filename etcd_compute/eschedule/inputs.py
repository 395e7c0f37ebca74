"""What the user hands eschedule, checked on this machine before anything is claimed.

Paths (`*_path`) are read here; references (`*_ref`) are passed on for the compute host
to fetch. Each problem is a UsageError (exit 2) naming the argument.
"""

from __future__ import annotations

import re
import uuid as uuidlib
from pathlib import Path

from etcd_compute import contract
from etcd_compute.errors import UsageError

SSH_KEY = re.compile(r"^(ssh-(rsa|ed25519|dss)|ecdsa-sha2-|sk-)\S* \S+")


def check_uuid(value: str, what: str = "instance") -> str:
    try:
        return str(uuidlib.UUID(value))
    except ValueError:
        raise UsageError(f"not a{'n' if what[0] in 'aeiou' else ''} {what} uuid: {value!r}") from None


# An instance's name is its guest's hostname: a DNS label (RFC 1123), lower case, starting with a
# letter (so that a name is never taken for a uuid or its prefix), not ending in '-'.
NAME = re.compile(r"[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?")
# What a reference to an instance may be: its uuid, a prefix of it, its name, or PROJECT/NAME.
UUID_PREFIX = re.compile(r"[0-9a-f][0-9a-f-]{0,35}")
# Names of flavors, images (and their aliases) and server groups: what people type, and an etcd key part.
LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_name(value: str) -> str:
    if not isinstance(value, str) or not NAME.fullmatch(value) or contract.looks_like_uuid(value):
        raise UsageError(f"not an instance name: {value!r:.80} (a DNS label: lower-case letters, digits and '-', "
                         "starting with a letter, at most 63)")
    return value


def check_label(value: str, what: str) -> str:
    if not isinstance(value, str) or not LABEL.fullmatch(value):
        raise UsageError(f"not a{'n' if what[0] in 'aeiou' else ''} {what} name: {value!r:.80} "
                         "(letters, digits, '_', '.', '-'; at most 64)")
    return value


def image_ref(ref: str | None) -> str | None:
    """An image reference as the compute host will read it (a relative path made absolute)."""
    if not ref:
        return None
    if "://" not in ref and not ref.startswith("/"):
        ref = str(Path(ref).resolve())
    problem = contract.image_ref_problem(ref)
    if problem:
        raise UsageError(problem)
    return ref


def sha256(value: str | None) -> str | None:
    if value is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", value):
        raise UsageError(f"--image-sha256 must be 64 hex digits, got {value!r}")
    return value.lower() if value else None


# Project names: what Placement takes as a project_id and etcd as a key part, and a person can type.
PROJECT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_KEY = 16 * 1024


def check_project(value: str) -> str:
    if not isinstance(value, str) or not PROJECT.fullmatch(value):
        raise UsageError(f"not a project name: {value!r} (letters, digits, '_', '.', '-'; at most 64)")
    return value


def check_text(data: str | bytes, what: str, limit: int) -> str:
    """Text as handed over (a file's bytes, or a string from the API), within `limit` bytes."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if len(raw) > limit:
        raise UsageError(f"{what} is {len(raw)} bytes; at most {limit} are accepted")
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise UsageError(f"{what} is not UTF-8 text") from None


def read_text(path: str, what: str, limit: int) -> str:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"{what} {path}: {exc.strerror}") from None
    return check_text(data, f"{what} {path}", limit)


def check_key(text: str, what: str) -> str:
    key = check_text(text, what, MAX_KEY).strip()
    if not SSH_KEY.match(key) or "\n" in key:
        raise UsageError(f"{what} is not one OpenSSH public key line (ssh-ed25519 AAAA... comment)")
    return key


def read_key(path: str) -> str:
    return check_key(read_text(path, "ssh key", MAX_KEY), f"ssh key {path}")


def read_user_data(path: str | None) -> str | None:
    return read_text(path, "user-data", contract.MAX_USER_DATA) if path else None

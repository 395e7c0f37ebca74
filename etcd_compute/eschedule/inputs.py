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


def check_uuid(value: str) -> str:
    try:
        return str(uuidlib.UUID(value))
    except ValueError:
        raise UsageError(f"not an instance uuid: {value!r}") from None


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


def read_text(path: str, what: str, limit: int) -> str:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"{what} {path}: {exc.strerror}") from None
    if len(data) > limit:
        raise UsageError(f"{what} {path} is {len(data)} bytes; at most {limit} are accepted")
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise UsageError(f"{what} {path} is not UTF-8 text") from None


def read_key(path: str) -> str:
    key = read_text(path, "ssh key", 16 * 1024).strip()
    if not SSH_KEY.match(key) or "\n" in key:
        raise UsageError(f"ssh key {path} is not one OpenSSH public key line (ssh-ed25519 AAAA... comment)")
    return key


def read_user_data(path: str | None) -> str | None:
    return read_text(path, "user-data", contract.MAX_USER_DATA) if path else None

"""Throwaway certificates (openssl) and private etcd processes that demand TLS client certs or auth."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from devstack import harness


def openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


def make_ca(d: Path, name: str) -> tuple[Path, Path]:
    cert, key = d / f"{name}.crt", d / f"{name}.key"
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
            "-keyout", key, "-out", cert)
    key.chmod(0o600)
    return cert, key


def make_cert(d: Path, name: str, ca: tuple[Path, Path], ext: str) -> tuple[Path, Path]:
    """A key and a certificate for `name`, signed by `ca`, with the X.509 extensions `ext`."""
    cert, key, csr, extfile = (d / f"{name}{s}" for s in (".crt", ".key", ".csr", ".ext"))
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", key, "-out", csr)
    key.chmod(0o600)
    extfile.write_text(ext + "\n")
    openssl("x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
            "-days", "2", "-extfile", extfile, "-out", cert)
    return cert, key


def make_pki(d: Path) -> dict[str, Path]:
    """A CA, a server cert for 127.0.0.1, a client cert, and a client cert from a foreign CA."""
    d.mkdir(mode=0o700, exist_ok=True)
    ca, other_ca = make_ca(d, "ca"), make_ca(d, "other-ca")
    server = make_cert(d, "server", ca, "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth")
    client = make_cert(d, "client", ca, "extendedKeyUsage=clientAuth")
    stranger = make_cert(d, "stranger", other_ca, "extendedKeyUsage=clientAuth")
    return {"ca": ca[0], "server_cert": server[0], "server_key": server[1],
            "client_cert": client[0], "client_key": client[1],
            "stranger_cert": stranger[0], "stranger_key": stranger[1]}


def etcdctl(endpoint: str, *args: str, pki: dict | None = None, user: str | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
    flags = [f"--endpoints={endpoint}", "--dial-timeout=2s", "--command-timeout=5s"]
    if pki:
        flags += [f"--cacert={pki['ca']}", f"--cert={pki['client_cert']}", f"--key={pki['client_key']}"]
    if user:
        flags.append(f"--user={user}")
    # etcdctl refuses a flag together with its environment variable (`source .stack/env` and
    # `python3 -m devstack test` export ETCDCTL_ENDPOINTS), so none of those are passed on.
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCDCTL_")}
    return subprocess.run(["etcdctl", *flags, *args], capture_output=True, text=True, timeout=30,
                          check=check, env=dict(env, ETCDCTL_API="3"))


class Etcd(harness.Etcd):
    """The harness's private etcd, https with client-cert-auth if `pki`; health asked with etcdctl,
    which speaks TLS and auth.

    `user` ("name:password") is what etcdctl uses once auth is enabled."""

    def __init__(self, d: Path, pki: dict | None = None) -> None:
        tls = ["--cert-file", str(pki["server_cert"]), "--key-file", str(pki["server_key"]),
               "--trusted-ca-file", str(pki["ca"]), "--client-cert-auth"] if pki else []
        super().__init__(d, scheme="https" if pki else "http", args=tls)
        self.pki, self.user = pki, None

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return etcdctl(self.endpoint, *args, pki=self.pki, user=self.user, check=check)

    def healthy(self) -> bool:
        return self.ctl("endpoint", "health", check=False).returncode == 0

"""etcd that demands TLS client certificates or a user and password.

Each kind runs as a private etcd of this module (tests/etcdtls.py): https with
--client-cert-auth, and plain http with `auth enable`, where user `ec` may read
and write keys under /test- only. The real eschedule and ecompute work with the
right credentials and fail with one clear line without them; a config file
holding a password, or naming a private key file, that everyone can read is refused.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from devstack.harness import BIN, Ecompute, wait_until

import etcdtls
from conftest import Cloud, Result

PASSWORD = "ec-pw-4711"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return etcdtls.make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_etcd(pki: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with etcdtls.Etcd(tmp_path_factory.mktemp("tls-etcd"), pki) as e:
        yield e.endpoint


@pytest.fixture(scope="module")
def auth_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[etcdtls.Etcd]:
    with etcdtls.Etcd(tmp_path_factory.mktemp("auth-etcd")) as e:
        for args in (["user", "add", "root:root-pw-0815"], ["role", "add", "root"],
                     ["user", "grant-role", "root", "root"],
                     ["user", "add", f"ec:{PASSWORD}"], ["role", "add", "ec"],
                     ["role", "grant-permission", "ec", "--prefix=true", "readwrite", "/test-"],
                     ["user", "grant-role", "ec", "ec"], ["auth", "enable"]):
            e.ctl(*args)
        e.user = "root:root-pw-0815"
        yield e


def tls(endpoint: str, pki: dict, client: str = "client") -> dict:
    return {"endpoints": [endpoint], "ca_cert": str(pki["ca"]),
            "cert_cert": str(pki[f"{client}_cert"]), "cert_key": str(pki[f"{client}_key"])}


def auth(endpoint: str, user: str = "ec", password: str = PASSWORD) -> dict:
    return {"endpoints": [endpoint], "user": user, "password": password}


def eschedule(cloud: Cloud, etcd: dict, *args: str, mode: int = 0o600) -> Result:
    """The real eschedule, with a schedule.yaml (of `mode`) for `etcd` under the cloud's prefix."""
    path = cloud.write("secure-schedule.yaml", {
        "etcd": {"prefix": cloud.prefix, "timeout": 3, **etcd},
        "placement": {"endpoint": cloud.stack["placement"]},
        "wait_timeout": 30, "default_image": None})
    path.chmod(mode)
    return cloud.eschedule(*args, config=path)


def assert_fails(r: Result, rc: int, *words: str) -> None:
    """Exit code `rc` and exactly one line on stderr, holding all of `words`."""
    lines = r.err.splitlines()
    assert r.rc == rc and len(lines) == 1 and all(w in lines[0] for w in words), r


def compute_for(cloud: Cloud, etcd: dict, mode: int = 0o600) -> Ecompute:
    """The cloud's usual compute.yaml (of `mode`), with `etcd` as its etcd section."""
    cp = cloud.compute("host1", start=False)
    cfg = yaml.safe_load(cp.config.read_text())
    cfg["etcd"] = {"prefix": cloud.prefix, **etcd}
    cp.config.chmod(mode)
    cp.config.write_text(yaml.safe_dump(cfg))
    return cp


def start_compute(cloud: Cloud, etcd: dict) -> Ecompute:
    """A real ecompute on this etcd, ready and UP as eschedule sees it through the same etcd."""
    cp = cloud.start(compute_for(cloud, etcd))

    def up() -> bool:
        r = eschedule(cloud, etcd, "hosts", "--json")
        return r.rc == 0 and any(h["uuid"] == cp.host and h["state"].upper() == "UP" for h in r.json())

    wait_until(up, 30, "ecompute to be UP", proc=cp.proc, log=cp.log)
    return cp


def boot_and_destroy(cloud: Cloud, etcd: dict, cp: Ecompute) -> None:
    # in_tree: only our host, whatever else the suite's Placement holds
    r = eschedule(cloud, etcd, f"resources=VCPU:1,MEMORY_MB:128&in_tree={cp.host}", "--wait", "--json")
    assert r.rc == 0, (r, cp.logtext())
    view = r.json()
    assert (view["state"], view["host"]) == ("ACTIVE", cp.host), view
    assert cloud.usages(cp.host)["MEMORY_MB"] == 128
    r = eschedule(cloud, etcd, "destroy", view["uuid"], "--wait")
    assert r.rc == 0, (r, cp.logtext())
    assert eschedule(cloud, etcd, "list", "--json").json() == []
    assert not any(cloud.usages(cp.host).values())
    assert cp.stop() == 0, cp.logtext()  # cloud.cleanup deletes the provider


# -- TLS with client certificates ---------------------------------------------------------------

def test_tls_with_client_cert_works(cloud: Cloud, tls_etcd: str, pki: dict) -> None:
    r = eschedule(cloud, tls(tls_etcd, pki), "list", "--json")
    assert (r.rc, r.out.strip(), r.err) == (0, "[]", ""), r


@pytest.mark.parametrize("settings", [
    pytest.param(lambda ep, pki: {"endpoints": [ep]}, id="plaintext"),
    pytest.param(lambda ep, pki: {"endpoints": [ep], "ca_cert": str(pki["ca"])},
                 id="no-client-cert"),
    pytest.param(lambda ep, pki: tls(ep, pki, "stranger"), id="cert-of-another-ca"),
])
def test_tls_without_the_right_client_cert_is_unreachable(cloud: Cloud, tls_etcd: str, pki: dict,
                                                          settings) -> None:
    assert_fails(eschedule(cloud, settings(tls_etcd, pki), "list"), 5, "etcd unreachable")


def test_world_readable_cert_key_is_refused(cloud: Cloud, tls_etcd: str, pki: dict) -> None:
    key = shutil.copy(pki["client_key"], cloud.tmp / "client.key")
    Path(key).chmod(0o644)
    r = eschedule(cloud, {**tls(tls_etcd, pki), "cert_key": str(key)}, "list")
    assert_fails(r, 2, "readable by everyone", "etcd.cert_key")


@pytest.mark.parametrize("change", [{"cert_key": None}, {"ca_cert": None},
                                    {"cert_key": "/nonexistent/client.key"}],
                         ids=["no-cert-key", "no-ca-cert", "missing-key-file"])
def test_incomplete_tls_settings_are_a_config_error(cloud: Cloud, tls_etcd: str, pki: dict,
                                                    change: dict) -> None:
    assert_fails(eschedule(cloud, {**tls(tls_etcd, pki), **change}, "list"), 2, "etcd.")


def test_tls_end_to_end(cloud: Cloud, tls_etcd: str, pki: dict) -> None:
    boot_and_destroy(cloud, tls(tls_etcd, pki), start_compute(cloud, tls(tls_etcd, pki)))


# -- user and password ----------------------------------------------------------------------------

def test_password_works(cloud: Cloud, auth_etcd: etcdtls.Etcd) -> None:
    r = eschedule(cloud, auth(auth_etcd.endpoint), "list", "--json")
    assert (r.rc, r.out.strip(), r.err) == (0, "[]", ""), r


@pytest.mark.parametrize("settings, words", [
    pytest.param({}, ("etcd unreachable", "user name is empty"), id="no-credentials"),
    pytest.param({"user": "ec", "password": "wrong"}, ("etcd unreachable", "authentication failed"),
                 id="wrong-password"),
    pytest.param({"user": "nobody", "password": PASSWORD}, ("etcd unreachable", "authentication failed"),
                 id="unknown-user"),
])
def test_without_the_right_password_is_unreachable(cloud: Cloud, auth_etcd: etcdtls.Etcd,
                                                   settings: dict, words: tuple) -> None:
    assert_fails(eschedule(cloud, {"endpoints": [auth_etcd.endpoint], **settings}, "list"), 5, *words)


def test_user_is_confined_to_its_prefix(cloud: Cloud, auth_etcd: etcdtls.Etcd) -> None:
    elsewhere = {**auth(auth_etcd.endpoint), "prefix": "/elsewhere"}  # ec may use /test-* only
    assert_fails(eschedule(cloud, elsewhere, "list"), 5, "permission denied")


@pytest.mark.parametrize("settings", [{"user": "ec"}, {"password": PASSWORD}], ids=["no-password", "no-user"])
def test_incomplete_credentials_are_a_config_error(cloud: Cloud, auth_etcd: etcdtls.Etcd,
                                                   settings: dict) -> None:
    assert_fails(eschedule(cloud, {"endpoints": [auth_etcd.endpoint], **settings}, "list"), 2, "etcd.")


def test_world_readable_password_file_is_refused(cloud: Cloud, auth_etcd: etcdtls.Etcd) -> None:
    assert_fails(eschedule(cloud, auth(auth_etcd.endpoint), "list", mode=0o644), 2,
                 "readable by everyone", "etcd.password")
    cp = compute_for(cloud, auth(auth_etcd.endpoint), mode=0o644)
    p = subprocess.run([str(BIN / "ecompute"), "--config", str(cp.config)],
                       capture_output=True, text=True, timeout=60)
    assert_fails(Result(p.returncode, p.stdout, p.stderr), 2, "readable by everyone", "etcd.password")


def test_password_end_to_end(cloud: Cloud, auth_etcd: etcdtls.Etcd) -> None:
    boot_and_destroy(cloud, auth(auth_etcd.endpoint), start_compute(cloud, auth(auth_etcd.endpoint)))


def test_ecompute_logs_in_again_after_etcd_restarts(cloud: Cloud, auth_etcd: etcdtls.Etcd) -> None:
    """etcd forgets its auth tokens when it restarts; ecompute must not be locked out for good."""
    cp = start_compute(cloud, auth(auth_etcd.endpoint))
    auth_etcd.restart()
    boot_and_destroy(cloud, auth(auth_etcd.endpoint), cp)

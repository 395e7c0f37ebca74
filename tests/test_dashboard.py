"""The dashboard (/ui) in a real browser: Debian's headless Chromium driven by selenium.

Live means without reloading: before waiting for something the stream must bring, the test
leaves a marker in `window`; a reload would lose it. Nothing is downloaded: the browser and
its driver are the system's, and selenium-manager is made to fail should anything call it.
"""

from __future__ import annotations

import asyncio
import http.client
import os
import shutil
import threading
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.selenium_manager import SeleniumManager
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import Select, WebDriverWait
from test_volumes import QUERY as VOLUME_QUERY
from test_volumes import images, vcloud  # noqa: F401 - vcloud is a fixture

import etcd_compute.api
from etcd_compute.api import live
from etcd_compute.errors import EtcdUnavailable, UnknownInstance

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
WAIT = 30.0  # seconds for anything the host or the stream must bring (the machine may be busy)


@pytest.fixture
def browser(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[WebDriver]:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("needs Debian's chromium and chromium-driver")

    def no_download(*args: Any) -> Any:
        raise AssertionError("selenium-manager was called: it would download a browser")

    monkeypatch.setattr(SeleniumManager, "binary_paths", no_download)
    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--window-size=1280,900", "--disable-extensions", f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER),
                                              log_output=str(tmp_path / "chromedriver.log")), options=options)
    driver.set_page_load_timeout(WAIT)
    yield driver
    driver.quit()


def wait(driver: WebDriver, condition: Any, timeout: float = WAIT) -> Any:
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)


def find(driver: WebDriver, css: str) -> WebElement:
    return wait(driver, ec.presence_of_element_located((By.CSS_SELECTOR, css)))


def text(driver: WebDriver, css: str) -> str:
    return str(driver.find_element(By.CSS_SELECTOR, css).text)


def mark(driver: WebDriver) -> None:
    driver.execute_script("window.ecMarker = 'not reloaded'")


def not_reloaded(driver: WebDriver) -> bool:
    return bool(driver.execute_script("return window.ecMarker === 'not reloaded'"))


def streaming(driver: WebDriver) -> None:
    """Until the page's stream has delivered its first update."""
    wait(driver, lambda d: text(d, "#live").startswith("Live"))


def log_in(driver: WebDriver, url: str, token: str, then: str = "/ui/instances") -> None:
    driver.get(url + "/ui/login")
    find(driver, "#token").send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "main form button[type=submit]").click()
    wait(driver, ec.url_contains(then))


def log_out(driver: WebDriver) -> None:
    driver.find_element(By.CSS_SELECTOR, "header form button").click()
    wait(driver, ec.url_contains("/ui/login"))


def cross_site_post(url: str, token: str, path: str) -> int:
    """A form post carrying the cookie but coming from another site (as a browser ignoring
    SameSite would send it): the status it gets."""
    conn = http.client.HTTPConnection(urlsplit(url).netloc, timeout=WAIT)
    conn.request("POST", path, body="action=stop", headers={
        "Cookie": f"ec_token={token}", "Origin": "http://evil.example", "Content-Type":
        "application/x-www-form-urlencoded"})
    status = conn.getresponse().status
    conn.close()
    return status


def ui_js_post(url: str, token: str, path: str) -> tuple[int, Any]:
    """A form post as ui.js sends it (fetch, X-Requested-With): its status and JSON answer."""
    import json
    conn = http.client.HTTPConnection(urlsplit(url).netloc, timeout=WAIT)
    conn.request("POST", path, body="", headers={"Cookie": f"ec_token={token}", "X-Requested-With": "ui.js",
                                                 "Content-Type": "application/x-www-form-urlencoded"})
    answer = conn.getresponse()
    found = answer.status, json.loads(answer.read())
    conn.close()
    return found


def test_one_watch_wakes_each_stream_once_per_burst_and_only_for_its_keys() -> None:
    """live.stream without etcd: the hub's watch callbacks are called from a thread, as the
    watch's own thread calls them."""
    hub = live.Hub(lambda: None)  # no store, no watch: its callbacks are called by hand
    hub.prefix = "/p/"
    world: dict[str, Any] = {"n": 0, "fail": True, "gone": False, "reads": 0}

    def read() -> dict[str, Any]:
        world["reads"] += 1
        if world["gone"]:
            raise UnknownInstance("no instance x")
        if world["fail"]:
            world["fail"] = False
            raise EtcdUnavailable("etcd unreachable")
        return {"n": world["n"]}

    def from_watch(*keys: str) -> None:
        thread = threading.Thread(target=lambda: [hub._on_event(k, 1) for k in keys])
        thread.start()
        thread.join()

    async def run() -> list[tuple[str | None, str]]:
        got = []
        stream = live.stream(hub, read, live.instance_keys("x"), coalesce=0.05, retry=0.3)
        for step in range(4):
            if step == 2:
                world["n"] = 1
                from_watch(*["/p/instances/x"] * 20, "/p/consoles/x", "/p/requests/h/x")  # one burst
            if step == 3:
                world["gone"] = True
                from_watch("/p/requests/h/x")
            event = await asyncio.wait_for(anext(stream), 10)
            got.append((event.event, event.data))
            assert hub.streams == 1
        with pytest.raises(StopAsyncIteration):
            await anext(stream)
        return got

    got = asyncio.run(run())
    assert got == [("update", '{"error": "etcd unreachable"}'),  # a failed read is said, and retried
                   ("update", '{"n": 0}'), ("update", '{"n": 1}'), ("gone", '{"error": "no instance x"}')]
    assert world["reads"] == 4 and hub.streams == 0
    wants = live.instance_keys("x")
    assert wants("alive/h") and wants("consoles/x") and not wants("instances/y") and not wants("tokens/x")
    assert live.instances_keys("quotas/p") and not live.instances_keys("consoles/x")


@pytest.mark.browser
def test_dashboard(cloud: Any, stack: dict, browser: WebDriver) -> None:
    host = cloud.compute("host1", stop_timeout=1)  # test:///default ignores ACPI: powered off after 1 s
    api = cloud.api()
    project, other = f"dash-{uuidlib.uuid4().hex[:8]}", f"dash-{uuidlib.uuid4().hex[:8]}"
    member, stranger, admin = cloud.token(project), cloud.token(other), cloud.token("dash-ops", admin=True)
    artifacts = Path(stack["stack"]) / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    d = browser
    try:
        # Without a cookie every page leads to the login page; a bad token stays there, saying why.
        d.get(api.url + "/ui/instances")
        wait(d, ec.url_contains("/ui/login"))
        log_in(d, api.url, "ect_000000000000_" + "x" * 43, then="/ui/login")
        assert "revoked token" in find(d, "#login-error").text
        log_in(d, api.url, member)
        cookie = d.get_cookie("ec_token")
        assert cookie and cookie["httpOnly"] and cookie["sameSite"] == "Strict", cookie
        assert not d.execute_script("return document.cookie"), "scripts must not see the token"
        streaming(d)
        assert not d.find_elements(By.CSS_SELECTOR, "#instances tbody tr")

        # The list stays open in this tab; another tab schedules from the form.
        mark(d)
        list_tab = d.current_window_handle
        d.switch_to.new_window("tab")
        d.get(api.url + "/ui/schedule")
        assert find(d, "#query").get_attribute("value") == "resources=VCPU:1,MEMORY_MB:256,DISK_GB:1"
        d.find_element(By.CSS_SELECTOR, "#query").clear()
        d.find_element(By.CSS_SELECTOR, "#query").send_keys("resources=VCPU:100000,MEMORY_MB:256,DISK_GB:1")
        d.find_element(By.CSS_SELECTOR, "form.card button[type=submit]").click()
        said = find(d, "#schedule-error").text  # said on the form, in one line, with the shortfall
        assert "no capacity" in said and "VCPU: asked 100000, at most 8 free on any up host" in said, said
        d.find_element(By.CSS_SELECTOR, "#query").clear()
        d.find_element(By.CSS_SELECTOR, "#query").send_keys("resources=VCPU:1,MEMORY_MB:256,DISK_GB:1")
        d.find_element(By.CSS_SELECTOR, "#user_data").send_keys("#cloud-config\n")
        d.find_element(By.CSS_SELECTOR, "form.card button[type=submit]").click()
        wait(d, ec.url_matches(r"/ui/instances/[0-9a-f-]{36}$"))  # the new instance's page
        uuid = d.current_url.rsplit("/", 1)[1]
        detail_tab = d.current_window_handle

        # It appears on the list and turns ACTIVE there, with its host, without a reload.
        d.switch_to.window(list_tab)
        row = find(d, f'#instances tr[data-uuid="{uuid}"][data-state="ACTIVE"]')
        assert not_reloaded(d)
        assert "ACTIVE" in row.text and cloud.compute_config("host1")["name"] in row.text
        assert "VCPU" in text(d, "#usage") and "instances" in text(d, "#usage")
        d.save_screenshot(str(artifacts / "dashboard-list.png"))
        # The filters: text on uuid, IP and host; state, which holds while the rows change.
        d.find_element(By.CSS_SELECTOR, "#filter-text").send_keys("no-such-thing")
        wait(d, lambda d: not row.is_displayed())
        d.find_element(By.CSS_SELECTOR, "#filter-text").clear()
        d.find_element(By.CSS_SELECTOR, "#filter-text").send_keys(host.host[:8])
        wait(d, lambda d: d.find_element(By.CSS_SELECTOR, f'tr[data-uuid="{uuid}"]').is_displayed())
        Select(d.find_element(By.CSS_SELECTOR, "#filter-state")).select_by_value("ACTIVE")

        # Its page (the other tab): fields, events; stop it and see STOPPED come in live.
        d.switch_to.window(detail_tab)
        streaming(d)
        wait(d, lambda d: "ACTIVE" in text(d, "#events"))
        assert text(d, "[data-field=host]") == host.host
        mark(d)
        d.find_element(By.CSS_SELECTOR, "button[name=action][value=stop]").click()
        wait(d, lambda d: text(d, "[data-field=state]") == "STOPPED")
        wait(d, lambda d: "STOPPED" in text(d, "#events"))
        assert not_reloaded(d) and d.find_element(By.CSS_SELECTOR, "#notice").get_attribute("hidden")
        assert d.find_element(By.CSS_SELECTOR, "button[value=suspend]").get_attribute("disabled")
        d.save_screenshot(str(artifacts / "dashboard-detail.png"))
        d.close()

        # The list saw it stop: still filtered to ACTIVE, so now hidden; shown again with all states.
        d.switch_to.window(list_tab)
        row = find(d, f'#instances tr[data-uuid="{uuid}"][data-state="STOPPED"]')
        assert not_reloaded(d) and not row.is_displayed()
        Select(d.find_element(By.CSS_SELECTOR, "#filter-state")).select_by_value("")
        assert row.is_displayed()
        row.find_element(By.CSS_SELECTOR, "a").click()
        wait(d, lambda d: text(d, "[data-field=state]") == "STOPPED")
        assert cross_site_post(api.url, member, f"/ui/instances/{uuid}/action") == 403

        # Another project's member: not on its list; its page is a 404 without its data; no hosts page.
        log_out(d)
        log_in(d, api.url, stranger)
        streaming(d)
        assert uuid not in d.page_source
        d.get(f"{api.url}/ui/instances/{uuid}")
        assert "404" in find(d, "h1").text
        body = text(d, "body")
        assert host.host not in body and "STOPPED" not in body and project not in body
        d.get(api.url + "/ui/hosts")
        assert "403" in find(d, "h1").text

        # Back as its member: destroy it; the page says it is gone, and so does the list.
        d.get(api.url + "/ui/instances")
        log_out(d)
        log_in(d, api.url, member)
        d.get(f"{api.url}/ui/instances/{uuid}")
        streaming(d)
        mark(d)
        d.find_element(By.CSS_SELECTOR, "button[name=destroy]").click()
        wait(d, ec.alert_is_present()).accept()
        wait(d, ec.visibility_of_element_located((By.CSS_SELECTOR, "#gone")))
        assert not_reloaded(d)
        d.get(api.url + "/ui/instances")
        streaming(d)
        assert not d.find_elements(By.CSS_SELECTOR, f'tr[data-uuid="{uuid}"]')

        # An admin sees the hosts, with a usage bar per resource class.
        log_out(d)
        log_in(d, api.url, admin)
        d.get(api.url + "/ui/hosts")
        row = find(d, f'#hosts tr[data-host="{host.host}"]')
        assert "UP" in row.text
        bars = row.find_elements(By.CSS_SELECTOR, "meter")
        assert {b.get_attribute("aria-label").split()[0] for b in bars} >= {"VCPU", "MEMORY_MB", "DISK_GB"}
        d.save_screenshot(str(artifacts / "dashboard-hosts.png"))
    except BaseException:
        d.save_screenshot(str(artifacts / "dashboard-failure.png"))
        raise
    if os.environ.get("ECOMPUTE_SCREENSHOT") == "1":
        shutil.copy(artifacts / "dashboard-list.png", Path(etcd_compute.api.__file__).parent / "static" /
                    "screenshot.png")


def fits(driver: WebDriver) -> bool:
    """Does the page fit the window's width (no sideways scrolling of the whole page)?"""
    return bool(driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth"))


@pytest.mark.browser
def test_dashboard_by_name_with_pickers_on_a_phone(cloud: Any, stack: dict, browser: WebDriver) -> None:
    """Issue 22: names everywhere, flavor, image and group pickers, a visible transitional state
    after an action, a host page, navigation on error pages, all at 400 px wide."""
    host = cloud.compute("host1", stop_timeout=5, image_dirs=[str(cloud.files)])  # ACPI ignored: off after 5 s
    api = cloud.api()
    project = f"dash-{uuidlib.uuid4().hex[:8]}"
    member, admin = cloud.token(project), cloud.token("dash-ops", admin=True)
    disk = cloud.files / "tiny.img"
    disk.write_bytes(b"\0" * 510 + b"\x55\xaa" + b"\0" * (1 << 20))
    for args in (["flavor", "create", "small", "VCPU=1", "MEMORY_MB=128", "DISK_GB=1"],
                 ["image", "add", "tiny", str(disk), "--public", "--alias", "tiny-1"],
                 ["--project", project, "group", "create", "web", "--policy", "anti-affinity"]):
        assert cloud.eschedule(*args).rc == 0, args
    artifacts = Path(stack["stack"]) / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    d = browser
    d.set_window_size(400, 900)
    try:
        log_in(d, api.url, member)
        streaming(d)
        assert fits(d)
        d.get(api.url + "/ui/schedule")
        assert fits(d)
        find(d, "#name").send_keys("web1")
        Select(d.find_element(By.CSS_SELECTOR, "#flavor")).select_by_value("small")
        Select(d.find_element(By.CSS_SELECTOR, "#image")).select_by_value("tiny")
        Select(d.find_element(By.CSS_SELECTOR, "#group")).select_by_value("web")
        d.find_element(By.CSS_SELECTOR, "form.card button[type=submit]").click()
        wait(d, ec.url_matches(r"/ui/instances/[0-9a-f-]{36}$"))
        uuid = d.current_url.rsplit("/", 1)[1]
        assert "web1" in find(d, "h1").text
        streaming(d)
        wait(d, lambda d: text(d, "[data-field=state]") == "ACTIVE")
        assert (text(d, "[data-field=flavor]"), text(d, "[data-field=group]"), text(d, "[data-field=image]")) == (
            "small", "web", "tiny")
        assert fits(d)
        d.save_screenshot(str(artifacts / "dashboard-phone-detail.png"))

        # An action shows what is under way at once, until the host has done it.
        mark(d)
        d.find_element(By.CSS_SELECTOR, "button[name=action][value=stop]").click()
        wait(d, lambda d: text(d, "[data-field=transition]") == "stopping…")
        wait(d, lambda d: text(d, "[data-field=state]") == "STOPPED")
        wait(d, lambda d: text(d, "[data-field=transition]") == "")
        assert not_reloaded(d)

        # The list: by name, with its short id; the same group refuses a second member on the one host.
        d.get(api.url + "/ui/instances")
        streaming(d)  # (the stream's first update redraws the rows)
        row = find(d, f'#instances tr[data-uuid="{uuid}"]')
        assert "web1" in row.text and uuid[:8] in row.text and uuid not in row.text
        d.find_element(By.CSS_SELECTOR, "#filter-text").send_keys("web1")
        assert d.find_element(By.CSS_SELECTOR, f'#instances tr[data-uuid="{uuid}"]').is_displayed()
        assert fits(d)
        d.save_screenshot(str(artifacts / "dashboard-phone-list.png"))
        d.get(api.url + "/ui/schedule")
        Select(find(d, "#flavor")).select_by_value("small")
        Select(d.find_element(By.CSS_SELECTOR, "#group")).select_by_value("web")
        d.find_element(By.CSS_SELECTOR, "form.card button[type=submit]").click()
        assert "anti-affinity group web" in find(d, "#schedule-error").text
        assert Select(d.find_element(By.CSS_SELECTOR, "#group")).first_selected_option.get_attribute("value") == "web"

        # An error page keeps the navigation.
        d.get(api.url + "/ui/instances/no-such-instance")
        assert "404" in find(d, "h1").text
        assert [a.text for a in d.find_elements(By.CSS_SELECTOR, "header nav a")] == [
            "Instances", "Volumes", "Images", "Schedule"]

        # An admin's host page: its usage and its instances, by name.
        log_out(d)
        log_in(d, api.url, admin)
        d.get(api.url + "/ui/hosts")
        find(d, f'#hosts tr[data-host="{host.host}"] a').click()
        wait(d, ec.url_contains(f"/ui/hosts/{host.host}"))
        assert "web1" in find(d, f'#instances tr[data-uuid="{uuid}"]').text
        assert {m.get_attribute("aria-label").split()[0] for m in d.find_elements(By.CSS_SELECTOR, "#usage meter")} \
            >= {"VCPU", "MEMORY_MB", "DISK_GB"}
        assert fits(d)
        d.get(api.url + "/ui/hosts/" + cloud.compute_config("host1")["name"])  # by name too
        assert "web1" in find(d, "#instances").text
    except BaseException:
        d.save_screenshot(str(artifacts / "dashboard-phone-failure.png"))
        raise


@pytest.mark.browser
def test_an_instance_page_draws_four_graphs_of_its_last_hour_live(cloud: Any, stack: dict,
                                                                   browser: WebDriver) -> None:
    """Issue 22, item 6: CPU, memory, network and disk over the last hour, inline SVG drawn by
    the server (no CDN, no script of anyone else's), kept current by the page's live stream."""
    import json

    from devstack.harness import free_port
    hypervisor = cloud.files / "host1" / "hypervisor"  # fake:///: counters that grow at rates we set
    cloud.compute("host1", uri=f"fake://{hypervisor}", metrics=f"127.0.0.1:{free_port()}", metrics_interval=1)
    api = cloud.api()
    project = f"dash-{uuidlib.uuid4().hex[:8]}"
    member = cloud.token(project)
    made = cloud.eschedule("--project", project, "resources=VCPU:1,MEMORY_MB:128", "--wait", "--json")
    assert made.rc == 0, made
    uuid = made.json()["uuid"]
    path = hypervisor / f"{uuid}.json"
    dom = json.loads(path.read_text())
    dom["rates"] = {"cpu_seconds": 0.25, "network_receive_bytes": 2048.0, "disk_write_bytes": 4096.0}
    path.write_text(json.dumps(dom))
    artifacts = Path(stack["stack"]) / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    d = browser
    try:
        log_in(d, api.url, member)
        d.get(f"{api.url}/ui/instances/{uuid}")
        streaming(d)
        graphs = d.find_elements(By.CSS_SELECTOR, "#graphs svg[data-graph]")
        assert [g.get_attribute("data-graph") for g in graphs] == ["cpu", "memory", "network", "disk"]
        assert all(g.get_attribute("role") == "img" and g.get_attribute("aria-label") for g in graphs)
        mark(d)

        def drawn(d: WebDriver) -> bool:  # every graph has a line with points, in this page, not reloaded
            return all(any(len((p.get_attribute("points") or "").split()) >= 2
                           for p in d.find_elements(By.CSS_SELECTOR, f'svg[data-graph="{g}"] polyline'))
                       for g in ("cpu", "memory", "network", "disk"))
        wait(d, drawn)
        first = d.find_element(By.CSS_SELECTOR, 'svg[data-graph="cpu"] polyline').get_attribute("points")
        wait(d, lambda d: d.find_element(By.CSS_SELECTOR, 'svg[data-graph="cpu"] polyline').get_attribute("points")
             != first)  # a newer sample came in on the stream
        assert not_reloaded(d)
        cpu_now = text(d, '[data-graph-last="cpu"]')
        assert cpu_now.endswith(" %") and 20 <= float(cpu_now.split()[0]) <= 30, cpu_now  # 0.25 s a second
        assert "KiB/s" in text(d, '[data-graph-last="network"]')
        assert not [s for s in d.find_elements(By.CSS_SELECTOR, "script[src]")
                    if not (s.get_attribute("src") or "").startswith(api.url + "/ui/static/")]
        d.save_screenshot(str(artifacts / "dashboard-graphs.png"))
    except BaseException:
        d.save_screenshot(str(artifacts / "dashboard-graphs-failure.png"))
        raise


def state_of(driver: WebDriver, css: str) -> str | None:
    """The data-state of what `css` finds ("" if it has none), None if nothing: read in one step,
    as the stream may redraw the element at any time."""
    found = driver.execute_script("const e = document.querySelector(arguments[0]); "
                                  "return e ? (e.dataset.state || '') : null", css)
    return None if found is None else str(found)


def volume_row(driver: WebDriver, vid: str) -> WebElement:
    return find(driver, f'#volumes tr[data-volume="{vid}"]')


def member_with_instance(cloud: Any, stack: dict, what: str, *args: str) -> tuple[Any, str, str, str, Path]:
    """The test's API server, a new project `what`-..., its member's token, an ACTIVE instance of it
    on the rbd host (`args`: an image, a name) and where screenshots go."""
    api = cloud.api()
    project = f"{what}-{uuidlib.uuid4().hex[:8]}"
    member = cloud.token(project)
    made = cloud.eschedule("--project", project, VOLUME_QUERY, *args, "--wait", "--json")
    assert made.rc == 0 and made.json()["state"] == "ACTIVE", made
    artifacts = Path(stack["stack"]) / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    return api, project, member, made.json()["uuid"], artifacts


@pytest.mark.browser
@pytest.mark.ceph
def test_volumes_are_made_attached_detached_and_deleted_from_the_dashboard(
        vcloud: Any, ceph: Any, stack: dict, browser: WebDriver) -> None:  # noqa: F811 - the fixture
    """Issue 19, item 5: the volumes page and an instance's page act through Volumes, so a volume
    made there is an RBD image of the stack's Ceph, attaching names it in the instance's request,
    and a refusal (a stale page deleting an attached volume) is the CLI's one line."""
    api, project, member, uuid, artifacts = member_with_instance(vcloud, stack, "dash", "--name", "db1")
    d = browser
    try:
        log_in(d, api.url, member)
        d.find_element(By.LINK_TEXT, "Volumes").click()
        wait(d, ec.url_contains("/ui/volumes"))
        assert find(d, "#empty").is_displayed()
        find(d, "#size_gb").clear()
        d.find_element(By.CSS_SELECTOR, "#size_gb").send_keys("2")
        d.find_element(By.CSS_SELECTOR, "#volume-name").send_keys("data")
        d.find_element(By.CSS_SELECTOR, "#create-volume button[type=submit]").click()
        row = find(d, '#volumes tr[data-state="available"]')
        vid = row.get_attribute("data-volume")
        assert "data" in row.text and "2 GiB" in row.text and vid[:8] in row.text, row.text
        assert f"vol-{vid}" in images(ceph)
        stale_tab = d.current_window_handle  # stays on the list, with the volume available

        # The instance's page offers it; attaching puts it in the instance's request.
        d.switch_to.new_window("tab")
        d.get(f"{api.url}/ui/instances/{uuid}")
        assert "No volumes attached" in find(d, "#volumes-empty").text
        Select(d.find_element(By.CSS_SELECTOR, "#attach-select")).select_by_value(vid)
        d.find_element(By.CSS_SELECTOR, "#attach-volume button[type=submit]").click()
        mine = f'#instance-volumes tr[data-volume="{vid}"]'
        find(d, mine)
        assert state_of(d, mine) in ("attaching", "in-use"), text(d, "#instance-volumes")
        request = vcloud.store.get_instance(uuid)[0]
        assert request is not None and [v["id"] for v in request["volumes"]] == [vid], request
        assert not d.find_elements(By.CSS_SELECTOR, "#attach-select")  # nothing else to attach
        mark(d)
        streaming(d)  # the stream redraws the volumes as its host moves them
        assert not_reloaded(d) and state_of(d, mine) in ("attaching", "in-use"), text(d, "#instance-volumes")
        assert state_of(d, mine + " button[name=detach]") is not None
        d.execute_script("arguments[0].scrollIntoView()", find(d, "#volumes-title"))
        d.save_screenshot(str(artifacts / "dashboard-instance-volumes.png"))

        # The list says where it is, linked to the instance; no delete while it is attached.
        d.get(api.url + "/ui/volumes")
        row = volume_row(d, vid)
        assert row.get_attribute("data-state") in ("attaching", "in-use") and "db1" in row.text, row.text
        assert not row.find_elements(By.CSS_SELECTOR, "button[name=delete]")
        assert row.find_element(By.CSS_SELECTOR, "[data-field=instance] a").get_attribute("href").endswith(
            f"/ui/instances/{uuid}")
        d.save_screenshot(str(artifacts / "dashboard-volumes.png"))
        d.close()

        # A page from before the attach still offers delete: refused, in one line, as the CLI says it.
        d.switch_to.window(stale_tab)
        volume_row(d, vid).find_element(By.CSS_SELECTOR, "button[name=delete]").click()
        wait(d, ec.alert_is_present()).accept()
        said = find(d, "#volume-error").text
        assert f"volume {vid} is " in said and "detach it first" in said and "\n" not in said, said
        assert f"vol-{vid}" in images(ceph)

        assert ui_js_post(api.url, member, f"/ui/volumes/{vid}/delete") == (409, {"error": said})
        assert cross_site_post(api.url, member, f"/ui/volumes/{vid}/detach") == 403

        # Detach from the list; once its host let go (at once without the host side) it is deleted.
        volume_row(d, vid).find_element(By.CSS_SELECTOR, "button[name=detach]").click()
        wait(d, lambda d: state_of(d, f'#volumes tr[data-volume="{vid}"]') in ("detaching", "available"))
        request = vcloud.store.get_instance(uuid)[0]
        assert request is not None and request["volumes"] == [], request

        def available(d: WebDriver) -> bool:
            d.get(api.url + "/ui/volumes")
            return volume_row(d, vid).get_attribute("data-state") == "available"
        wait(d, available)
        assert not volume_row(d, vid).find_elements(By.CSS_SELECTOR, "[data-field=instance] a")
        volume_row(d, vid).find_element(By.CSS_SELECTOR, "button[name=delete]").click()
        wait(d, ec.alert_is_present()).accept()
        wait(d, lambda d: not d.find_elements(By.CSS_SELECTOR, f'#volumes tr[data-volume="{vid}"]'))
        assert find(d, "#empty").is_displayed() and not d.find_elements(By.CSS_SELECTOR, "#volume-error")
        assert f"vol-{vid}" not in images(ceph) and vcloud.store.volume(vid) is None
    except BaseException:
        d.save_screenshot(str(artifacts / "dashboard-volumes-failure.png"))
        raise


def image_row(driver: WebDriver, name: str) -> WebElement:
    return find(driver, f'#images tr[data-image="{name}"]')


def submit(driver: WebDriver, css: str) -> None:
    """Click the submit button `css` and wait for the page the form brings (the old one's
    elements would go stale under the test's feet)."""
    old = driver.find_element(By.TAG_NAME, "html")
    driver.find_element(By.CSS_SELECTOR, css).click()
    wait(driver, ec.staleness_of(old))


@pytest.mark.browser
@pytest.mark.ceph
def test_an_instance_is_snapshotted_and_its_image_deleted_from_the_dashboard(
        vcloud: Any, ceph: Any, stack: dict, browser: WebDriver) -> None:  # noqa: F811 - the fixture
    """Issue 19: an rbd instance's page snapshots it through eschedule's snapshot (an image of its
    project's catalogue, an RBD image of the stack's Ceph); the images page lists it as a snapshot
    and deletes it, refused in the CLI's one line while an instance's disk is a clone of it."""
    base = vcloud.files / "rbd" / "base.raw"  # a raw disk image on the rbd host: its instance's disk is in Ceph
    base.write_bytes((b"\0" * 510 + b"\x55\xaa").ljust(1 << 20, b"\0") + b"\0" * (1 << 20))
    api, project, member, uuid, artifacts = member_with_instance(vcloud, stack, "snap", str(base), "--name", "web1")
    d = browser
    try:
        log_in(d, api.url, member)
        d.get(f"{api.url}/ui/instances/{uuid}")
        find(d, "#snapshot-name").send_keys("golden")
        submit(d, "#snapshot button[type=submit]")
        said = find(d, "#notice").text
        entries = [i for i in vcloud.store.images() if i["scope"] == project]
        assert [i["name"] for i in entries] == ["golden"], entries
        target = entries[0]["url"].rpartition("/")[2]
        assert entries[0]["url"] == f"rbd:{ceph.pool}/{target}" and target.startswith("img-snap-"), entries
        assert target in ceph.rbd("ls", ceph.pool).split()
        assert said == f"Snapshot made: image golden ({entries[0]['url']})", said
        assert d.current_url.startswith(f"{api.url}/ui/instances/{uuid}")
        assert "done" in (find(d, "#notice").get_attribute("class") or "")
        d.execute_script("arguments[0].scrollIntoView()", find(d, "#snapshot-title"))
        d.save_screenshot(str(artifacts / "dashboard-snapshot.png"))

        # The same name again: the CLI's refusal, in one line, on the instance's page.
        find(d, "#snapshot-name").send_keys("golden")
        submit(d, "#snapshot button[type=submit]")
        said = find(d, "#notice").text
        assert said == f"image golden exists already in project {project}", said
        assert "error" in (find(d, "#notice").get_attribute("class") or "")

        # The images page lists it as a snapshot of the project.
        d.find_element(By.LINK_TEXT, "Images").click()
        wait(d, ec.url_contains("/ui/images"))
        row = image_row(d, "golden")
        assert row.get_attribute("data-kind") == "snapshot", row.text
        assert text(d, '#images tr[data-image="golden"] [data-field=scope]') == project
        assert text(d, '#images tr[data-image="golden"] [data-field=kind]') == "snapshot in Ceph"
        assert "-" in row.text and not find(d, "#empty").is_displayed()
        d.save_screenshot(str(artifacts / "dashboard-images.png"))

        # An instance booted from it holds it: deleting it is refused in one line, the image stays.
        copy = vcloud.eschedule("--project", project, VOLUME_QUERY, "golden", "--wait", "--json")
        assert copy.rc == 0 and copy.json()["state"] == "ACTIVE", copy
        clone = copy.json()["uuid"]
        image_row(d, "golden").find_element(By.CSS_SELECTOR, "button[name=delete]").click()
        wait(d, ec.alert_is_present()).accept()
        said = find(d, "#image-error").text
        assert said == f"image golden is in use: 1 instances' disks are clones of it ({clone}); destroy them first", \
            said
        assert target in ceph.rbd("ls", ceph.pool).split() and image_row(d, "golden")
        assert ui_js_post(api.url, member, "/ui/images/golden/delete") == (409, {"error": said})
        assert cross_site_post(api.url, member, "/ui/images/golden/delete") == 403

        # Once that instance is gone the delete goes through, its RBD image with it.
        assert vcloud.eschedule("--project", project, "destroy", clone, "--wait").rc == 0
        d.get(api.url + "/ui/images")
        image_row(d, "golden").find_element(By.CSS_SELECTOR, "button[name=delete]").click()
        wait(d, ec.alert_is_present()).accept()
        wait(d, lambda d: not d.find_elements(By.CSS_SELECTOR, '#images tr[data-image="golden"]'))
        assert find(d, "#empty").is_displayed() and not d.find_elements(By.CSS_SELECTOR, "#image-error")
        assert target not in ceph.rbd("ls", ceph.pool).split()
        assert [i for i in vcloud.store.images() if i["scope"] == project] == []
    except BaseException:
        d.save_screenshot(str(artifacts / "dashboard-snapshot-failure.png"))
        raise

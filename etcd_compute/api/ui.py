"""The dashboard, /ui: server-rendered pages for a person with a token, kept live by one stream.

The token is kept in an HttpOnly, SameSite=Strict cookie (scripts cannot read it, other sites
cannot send it) and authenticated on every request exactly as the API authenticates a bearer
token (Server.caller), so a page shows only what that token may see through /v1. Every page
works without JavaScript; ui.js adds the live updates (/ui/events, see live.py), the list's
filters and actions that do not reload the page. Output is escaped by Jinja2 (autoescape),
and no script runs but ui.js (the Content-Security-Policy allows only 'self').
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import quote, urlsplit

import jinja2
import markupsafe
from fastapi import APIRouter, FastAPI, Form, Query, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from etcd_compute import contract
from etcd_compute.api import graphs, live
from etcd_compute.api.context import Caller, Server, http_status
from etcd_compute.contract import PUBLIC
from etcd_compute.errors import ECError, Forbidden, InvalidState, Unauthenticated, UnknownInstance, UsageError
from etcd_compute.eschedule import catalog, cephpool, output, snapshots
from etcd_compute.eschedule.volumes import Volumes
from etcd_compute.states import COMMANDS, Actual, Command, Desired, refusal

if TYPE_CHECKING:
    from etcd_compute.contract import Image, VolumeView

router = APIRouter(prefix="/ui", include_in_schema=False)

HERE = Path(__file__).parent
COOKIE = "ec_token"
DEFAULT_QUERY = "resources=VCPU:1,MEMORY_MB:256,DISK_GB:1"
HEADERS = {  # on every page: nothing but our own files, in no frame; data pages are not cached
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; "
                               "form-action 'self'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
LIST_FIELDS = ("uuid", "name", "project_id", "state", "desired", "reason", "ip", "host", "host_state", "flavor",
               "created_at")
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-_]|[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def age(stamp: str | None, now: datetime | None = None) -> str:
    """'42s', '5m', '3h', '2d' since an ISO time, as eschedule list says it (ui.js computes the same
    in the browser); nothing for none."""
    return output.age(stamp, now, unknown="")


env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                         trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
env.filters["age"] = age
env.filters["svg"] = lambda graph: markupsafe.Markup(graphs.svg(graph))  # noqa: S704 - built and escaped by graphs.svg
templates = Jinja2Templates(env=env)


# -- who is calling -----------------------------------------------------------------------------

def server_of(request: Request) -> Server:
    return request.app.state.server


def hub_of(request: Request) -> live.Hub:
    """The process's watch hub, made on first use (its watch starts with the first stream)."""
    state = request.app.state
    if getattr(state, "ui_hub", None) is None:
        server = server_of(request)
        state.ui_hub = live.Hub(lambda: server.ops.store)
    return state.ui_hub


def caller(request: Request, project: str | None = None) -> Caller:
    """The cookie's caller (Unauthenticated: error_page sends the browser to the login page)."""
    return server_of(request).caller(request.cookies.get(COOKIE), project)


def same_origin(request: Request) -> None:
    """Refuse a form posted from another site. The SameSite=Strict cookie already keeps other
    sites' posts unauthenticated; this also covers browsers that ignore SameSite."""
    origin = request.headers.get("origin")
    if origin is not None and urlsplit(origin).netloc != request.headers.get("host"):
        raise Forbidden("a form from another site was refused")


def wants_json(request: Request) -> bool:
    """ui.js posts forms with fetch() and this header, to act without leaving the page."""
    return request.headers.get("x-requested-with") == "ui.js"


def page(request: Request, name: str, who: Caller | None, code: int = 200, **context: Any) -> Response:
    response = templates.TemplateResponse(request, name, {"who": who, "active": name, **context}, status_code=code)
    response.headers.update(HEADERS)
    return response


def redirect(url: str) -> Response:
    return RedirectResponse(url, 303, headers=HEADERS)


def error_page(request: Request, exc: ECError, status: int) -> Response:
    """A /ui failure: the login page for a missing or bad token, the event stream's one line,
    or a page saying what went wrong (404 for another project's instance: it does not exist)."""
    if request.url.path == "/ui/events" or wants_json(request):
        return JSONResponse({"error": str(exc)}, status, headers=HEADERS)
    if isinstance(exc, Unauthenticated):
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        response = redirect("/ui/login" + (f"?next={quote(target)}" if request.method == "GET" else ""))
        response.delete_cookie(COOKIE, path="/ui")
        return response
    titles = {400: "Bad request", 403: "Forbidden", 404: "Not found", 409: "Conflict", 503: "Unavailable"}
    return page(request, "error.html", known_caller(request), status, status=status, title=titles.get(status, "Error"),
                message=str(exc))


def known_caller(request: Request) -> Caller | None:
    """The cookie's caller if it is a valid one (an error page keeps the navigation), else None."""
    try:
        return caller(request)
    except ECError:
        return None


# -- logging in and out -------------------------------------------------------------------------

def safe_next(target: str | None) -> str:
    """Where to go after logging in: a /ui page of this server, never another site."""
    if target and target.startswith("/ui/") and not target.startswith("/ui//") and "\\" not in target:
        return target
    return "/ui/instances"


@router.get("")
@router.get("/")
def home() -> Response:
    return redirect("/ui/instances")


@router.get("/login")
def login_form(request: Request, next: str | None = None) -> Response:
    return page(request, "login.html", None, next=safe_next(next), error=None)


@router.post("/login")
def login(request: Request, token: Annotated[str, Form()] = "",
          next: Annotated[str, Form()] = "") -> Response:
    same_origin(request)
    try:
        server_of(request).caller(token.strip())
    except Unauthenticated as exc:
        return page(request, "login.html", None, 401, next=safe_next(next), error=str(exc))
    response = redirect(safe_next(next))
    response.set_cookie(COOKIE, token.strip(), path="/ui", httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")
    return response


@router.post("/logout")
def logout(request: Request) -> Response:
    same_origin(request)
    response = redirect("/ui/login")
    response.delete_cookie(COOKIE, path="/ui")
    return response


# -- instances ------------------------------------------------------------------------------------

def host_names(who: Caller) -> dict[str, str]:
    """Host uuid -> the name its ecompute gave it (people know hosts by name)."""
    return who.ops.host_names()


TRANSITIONS = {(Desired.STOPPED, Actual.ACTIVE): "stopping", (Desired.STOPPED, Actual.SUSPENDED): "stopping",
               (Desired.ACTIVE, Actual.STOPPED): "starting", (Desired.ACTIVE, Actual.SUSPENDED): "resuming",
               (Desired.SUSPENDED, Actual.ACTIVE): "suspending", (Desired.ACTIVE, Actual.PENDING): "building",
               (Desired.ACTIVE, Actual.BUILDING): "building"}


def transition(view: contract.View, rebooting: bool = False) -> str | None:
    """What the host is doing to get the instance where it was asked to be ("stopping"), or None
    when it is there (or stuck: ERROR says so itself)."""
    desired, state = view["desired"], view["state"]
    if desired is None or state == Actual.ERROR:
        return None
    if desired == Desired.DELETED:
        return "deleting"
    if rebooting and state == Actual.ACTIVE:
        return "rebooting"
    return TRANSITIONS.get((Desired(desired), Actual(state)))


def rows(who: Caller, host: str | None = None) -> list[dict[str, Any]]:
    """The list's columns of every instance the caller may see (on `host`, if given)."""
    found = []
    for view in who.ops.instances(host=host):
        row = {k: view[k] for k in LIST_FIELDS}  # type: ignore[literal-required]
        row["host_name"], row["transition"] = view["host_name"], transition(view)
        found.append(row)
    return found


def usage_of(who: Caller) -> dict[str, Any] | None:
    """The project's usage against its limits, or None while Placement cannot say."""
    try:
        found = who.ops.usage()
    except ECError:
        return None
    names = sorted(set(found["usage"]) | set(found["limits"]), key=lambda n: (n != contract.INSTANCES, n))
    return {"project": found["project"],
            "items": [{"name": n, "used": found["usage"].get(n, 0), "limit": found["limits"].get(n)} for n in names]}


def list_payload(request: Request, project: str | None) -> dict[str, Any]:
    """What the list page shows, as the stream sends it (authenticated anew each time)."""
    who = caller(request, project)
    return {"instances": rows(who), "usage": usage_of(who)}


@router.get("/instances")
def instances(request: Request, project: str | None = None) -> Response:
    who = caller(request, project)
    return page(request, "instances.html", who, project=project, instances=rows(who), usage=usage_of(who),
                states=list(Actual))


def console_text(who: Caller, uuid: str, boot: int | None = None) -> str | None:
    """The console as text for a page, the current boot's tail or boot `boot`'s head and tail:
    decoded, terminal escapes and controls removed."""
    if boot is not None:
        data = contract.boots_bytes(who.ops.console_boots(uuid, boot), False)
    else:
        found = who.ops.console(uuid)
        if found is None:
            return None
        data, _ = contract.console_bytes(found)
    return ANSI.sub("", data.decode("utf-8", "replace").replace("\r\n", "\n"))


def actions(view: contract.View) -> dict[str, str | None]:
    """Each lifecycle command and why its button is off now (None: on): eschedule's refusals,
    and commands that would change nothing (start of an ACTIVE instance)."""
    if view["desired"] is None:
        return dict.fromkeys(Command, "its record is malformed")
    desired, actual = Desired(view["desired"]), Actual(view["state"])
    found: dict[str, str | None] = {}
    for command in Command:
        found[command] = refusal(command, desired, actual, view["reason"])
        if not found[command] and command != Command.REBOOT and COMMANDS[command] == desired == actual.lower():
            found[command] = f"it is {actual} already"
    return found


def rebooting(who: Caller, view: contract.View) -> bool:
    """Is a reboot asked for that its host has not carried out yet?"""
    if view["uuid"] is None or view["state"] != Actual.ACTIVE:
        return False
    try:
        request = who.ops.store.read_request(view["uuid"])[0]
    except contract.BadRecord:
        return False
    return request is not None and request.get("reboot", 0) > who.ops.reboots_done(view["uuid"])


def graphs_of(who: Caller, view: contract.View) -> dict[str, Any]:
    """The instance's graphs of the last hour, drawn for the page, and why they are empty if so."""
    found = graphs.instance_history(who, view["uuid"] or "", view)
    return {"graphs": graphs.plot(found["series"], time.time()), "graphs_note": found["note"]}


def volumes_of(who: Caller, view: contract.View, attachable: bool = True) -> dict[str, list[VolumeView]]:
    """The instance's volumes (attaching, in use, detaching) and, for the page's form, those of its
    project it could be given (available), as Volumes sees them: the page decides nothing itself.
    The live stream asks only for the instance's own (a read of the volumes and one of it)."""
    found = Volumes(who.ops).list(None if attachable else view["uuid"] or "")
    own = {"volumes": [v for v in found if view["uuid"] and v["instance"] == view["uuid"]]}
    if not attachable:
        return own
    return {**own, "attachable": [v for v in found if v["state"] == contract.VolumeState.AVAILABLE
                                  and v["project_id"] == view["project_id"]]}


def detail_payload(request: Request, uuid: str) -> dict[str, Any]:
    who = caller(request)
    view = who.ops.show(uuid)
    return {"view": {**view, "transition": transition(view, rebooting(who, view))},
            "console": console_text(who, view["uuid"] or uuid), "actions": actions(view),
            "volumes": volumes_of(who, view, attachable=False)["volumes"], **graphs_of(who, view)}


def instance_page(request: Request, who: Caller, uuid: str, notice: str | None = None, status: int = 200,
                  boot: int | None = None, done: str | None = None) -> Response:
    """The instance's page; `notice` is a refusal, `done` what an action made (shown, not alarming)."""
    view = who.ops.show(uuid)
    ref = view["uuid"] or uuid
    return page(request, "instance.html", who, status, view=view, console=console_text(who, ref, boot),
                host_name=view["host_name"], actions=actions(view), notice=notice or done,
                notice_ok=notice is None and done is not None,
                transition=transition(view, rebooting(who, view)), boot=boot, boots=who.ops.console_boots(ref),
                volumes_enabled=bool(who.ops.cfg.ceph.pool), **volumes_of(who, view), **graphs_of(who, view))


def snapshot_made(who: Caller, name: str | None) -> str | None:
    """The notice after a snapshot (the redirect names its image): said only of a snapshot image
    the caller sees, so a link cannot make the page say anything else."""
    try:
        found = catalog.find_image(who.ops, name) if name else None
    except ECError:
        return None
    if found is None or not cephpool.is_snapshot(found[0]["url"]):
        return None
    return f"Snapshot made: image {found[0]['name']} ({found[0]['url']})"


@router.get("/instances/{uuid}")
def instance(request: Request, uuid: str, boot: Annotated[int | None, Query(ge=1)] = None,
             snapshot: str | None = None) -> Response:
    who = caller(request)
    return instance_page(request, who, uuid, boot=boot, done=snapshot_made(who, snapshot))


def acting(request: Request, uuid: str, then: str | Callable[[Any], str], do: Callable[[Caller], object]) -> Response:
    """Run an action's form: then a redirect (`then`, or `then` of what `do` returned), or for
    ui.js (which stays on the page) an empty JSON answer. A refusal (InvalidState, ...) is shown
    on the instance's page, or to ui.js as JSON (error_page)."""
    same_origin(request)
    who = caller(request)
    try:
        made = do(who)
    except ECError as exc:
        if wants_json(request) or isinstance(exc, Unauthenticated):
            raise
        return instance_page(request, who, uuid, notice=" ".join(str(exc).split()), status=http_status(exc))
    if wants_json(request):
        return JSONResponse({}, headers=HEADERS)
    return redirect(then if isinstance(then, str) else then(made))


@router.post("/instances/{uuid}/action")
def act(request: Request, uuid: str, action: Annotated[Command, Form()]) -> Response:
    return acting(request, uuid, f"/ui/instances/{uuid}", lambda who: who.ops.act(action, uuid))


@router.post("/instances/{uuid}/destroy")
def destroy(request: Request, uuid: str) -> Response:
    return acting(request, uuid, "/ui/instances", lambda who: who.ops.destroy(uuid))


@router.post("/instances/{uuid}/attach")
def attach(request: Request, uuid: str, volume: Annotated[str, Form()] = "") -> Response:
    """Give the instance a volume of its project (the host attaches it; the page shows how far)."""
    return acting(request, uuid, f"/ui/instances/{uuid}", lambda who: Volumes(who.ops).attach(volume, uuid))


@router.post("/instances/{uuid}/detach")
def detach_from(request: Request, uuid: str, volume: Annotated[str, Form()] = "") -> Response:
    return acting(request, uuid, f"/ui/instances/{uuid}", lambda who: Volumes(who.ops).detach(volume))


@router.post("/instances/{uuid}/snapshot")
def snapshot(request: Request, uuid: str, name: Annotated[str, Form()] = "") -> Response:
    """Copy the instance's disk in Ceph into a new image of its project (eschedule snapshot); the
    page it goes back to says which."""
    def made(image: Image) -> str:
        return f"/ui/instances/{uuid}?snapshot={quote(image['name'])}"
    return acting(request, uuid, made, lambda who: snapshots.snapshot(who.ops, uuid, name.strip() or None))


# -- scheduling -------------------------------------------------------------------------------------

def schedule_choices(who: Caller) -> dict[str, Any]:
    """What the form offers: the flavors, the catalogue's images and the project's server groups."""
    return {"flavors": [{**f, "query": catalog.flavor_query(f)} for f in who.ops.store.flavors()],
            "images": catalog.images(who.ops), "groups": catalog.groups(who.ops)}


FORM_FIELDS = ("name", "flavor", "query", "image", "image_url", "group", "ssh_key", "user_data")


@router.get("/schedule")
def schedule_form(request: Request) -> Response:
    who = caller(request)
    form = dict.fromkeys(FORM_FIELDS, "")
    form["query"] = DEFAULT_QUERY
    return page(request, "schedule.html", who, form=form, error=None, **schedule_choices(who))


@router.post("/schedule")
def schedule(request: Request, query: Annotated[str, Form()] = "", image: Annotated[str, Form()] = "",
             ssh_key: Annotated[str, Form()] = "", user_data: Annotated[str, Form()] = "",
             name: Annotated[str, Form()] = "", flavor: Annotated[str, Form()] = "",
             image_url: Annotated[str, Form()] = "", group: Annotated[str, Form()] = "") -> Response:
    same_origin(request)
    who = caller(request)
    keys = [line.strip() for line in ssh_key.splitlines() if line.strip()]
    try:
        made = server_of(request).schedule(
            who, None if flavor else query.strip(), image=image_url.strip() or image.strip() or None,
            flavor=flavor or None, name=name.strip() or None, group=group or None, ssh_keys=keys,
            user_data=user_data or None)
    except Unauthenticated:
        raise
    except ECError as exc:
        form = {"query": query, "image": image, "ssh_key": ssh_key, "user_data": user_data, "name": name,
                "flavor": flavor, "image_url": image_url, "group": group}
        message = " ".join(str(exc).split())  # one line, however the message was built
        return page(request, "schedule.html", who, http_status(exc), form=form, error=message,
                    **schedule_choices(who))
    return redirect(f"/ui/instances/{made['uuid']}")


# -- volumes ---------------------------------------------------------------------------------------

def volume_rows(who: Caller) -> list[dict[str, Any]]:
    """Every volume the caller may see, with its instance's name (people know instances by name)."""
    found = Volumes(who.ops).list()
    names = {v["uuid"]: v["name"] for v in who.ops.instances()} if any(v["instance"] for v in found) else {}
    return [{**v, "instance_name": names.get(v["instance"]) if v["instance"] else None}
            for v in sorted(found, key=lambda v: (v["created_at"], v["id"]))]


def volumes_page(request: Request, who: Caller, project: str | None, error: str | None = None, status: int = 200,
                 form: dict[str, str] | None = None) -> Response:
    return page(request, "volumes.html", who, status, project=project, volumes=volume_rows(who), error=error,
                form=form or {"size_gb": "1", "name": ""}, enabled=bool(who.ops.cfg.ceph.pool))


@router.get("/volumes")
def volumes(request: Request, project: str | None = None) -> Response:
    return volumes_page(request, caller(request, project), project)


def list_acting(request: Request, project: str | None, path: str, do: Callable[[Caller], object],
                again: Callable[[Caller, str, int], Response]) -> Response:
    """Run a list page's form: then back to the list at `path` (ui.js: an empty JSON answer), or
    the list again (`again`) with the refusal in one line, the CLI's message (ui.js: as JSON)."""
    same_origin(request)
    who = caller(request, project)
    try:
        do(who)
    except ECError as exc:
        if wants_json(request) or isinstance(exc, Unauthenticated):
            raise
        return again(who, " ".join(str(exc).split()), http_status(exc))
    if wants_json(request):
        return JSONResponse({}, headers=HEADERS)
    return redirect(path + (f"?project={quote(project)}" if project else ""))


def volume_acting(request: Request, project: str | None, do: Callable[[Volumes], object],
                  form: dict[str, str] | None = None) -> Response:
    """Run a volume form through Volumes (list_acting)."""
    return list_acting(request, project, "/ui/volumes", lambda who: do(Volumes(who.ops)),
                       lambda who, error, status: volumes_page(request, who, project, error, status, form))


def size_of(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise UsageError(f"a volume's size is a whole number of GiB, got {text.strip()!r:.20}") from None


@router.post("/volumes")
def create_volume(request: Request, project: str | None = None, size_gb: Annotated[str, Form()] = "",
                  name: Annotated[str, Form()] = "") -> Response:
    return volume_acting(request, project, lambda vols: vols.create(size_of(size_gb), name.strip() or None),
                         {"size_gb": size_gb, "name": name})


@router.post("/volumes/{ref}/delete")
def delete_volume(request: Request, ref: str, project: str | None = None) -> Response:
    return volume_acting(request, project, lambda vols: vols.delete(ref))


@router.post("/volumes/{ref}/detach")
def detach_volume(request: Request, ref: str, project: str | None = None) -> Response:
    return volume_acting(request, project, lambda vols: vols.detach(ref))


# -- images ----------------------------------------------------------------------------------------

def image_rows(who: Caller) -> list[dict[str, Any]]:
    """The catalogue as the caller sees it (catalog.images), each with its kind and whether the
    caller may delete it: its own project's, and public ones for admins (as DELETE /v1/images)."""
    found = []
    for i in sorted(catalog.images(who.ops), key=lambda i: (i["name"], i["scope"])):
        snap = cephpool.is_snapshot(i["url"])
        found.append({**i, "public": i["scope"] == PUBLIC, "snapshot": snap,
                      "kind": "snapshot in Ceph" if snap else i["url"], "created_at": i.get("created_at"),
                      "deletable": i["scope"] == who.ops.project or (i["scope"] == PUBLIC and who.admin)})
    return found


def images_page(request: Request, who: Caller, project: str | None, error: str | None = None,
                status: int = 200) -> Response:
    return page(request, "images.html", who, status, project=project, images=image_rows(who), error=error)


@router.get("/images")
def images(request: Request, project: str | None = None) -> Response:
    return images_page(request, caller(request, project), project)


def scope_name(scope: str) -> str:
    return "the public catalogue" if scope == PUBLIC else f"project {scope}"


def delete_entry(who: Caller, name: str, scope: str) -> None:
    """Delete image `name` of `scope` (a project, or PUBLIC: admins only). A name is looked up
    in the project first, then among the public ones: refused if that finds another scope's."""
    found = catalog.image(who.ops, name)
    if scope and found["scope"] != scope:
        raise InvalidState(f"image {name}: that name now finds the one of {scope_name(found['scope'])}, not "
                           f"of {scope_name(scope)}: reload the page")
    if found["scope"] == PUBLIC:
        who.require_admin("delete public images")
    catalog.delete_image(who.ops, name)


@router.post("/images/{name}/delete")
def delete_image(request: Request, name: str, project: str | None = None,
                 scope: Annotated[str, Form()] = "") -> Response:
    """Delete an image (a snapshot's RBD image too; refused while an instance's disk is a clone of it)."""
    return list_acting(request, project, "/ui/images", lambda who: delete_entry(who, name, scope),
                       lambda who, error, status: images_page(request, who, project, error, status))


# -- hosts -----------------------------------------------------------------------------------------

@router.get("/hosts")
def hosts(request: Request) -> Response:
    who = caller(request)
    who.require_admin("see the hosts")
    found = sorted(who.ops.hosts(), key=lambda h: h["name"])
    for host in found:
        bars(host)
    return page(request, "hosts.html", who, hosts=found)


def bars(host: dict[str, Any]) -> None:
    host["bars"] = [{"name": rc, "used": host["used"].get(rc, 0), "capacity": cap}
                    for rc, cap in sorted(host["capacity"].items())]


@router.get("/hosts/{ref}")
def host(request: Request, ref: str) -> Response:
    """One host (by name or uuid): its state, usage against capacity, and its instances."""
    who = caller(request)
    who.require_admin("see the hosts")
    uuid = who.ops.resolve_host(ref)
    found = next((h for h in who.ops.hosts() if h["uuid"] == uuid), None)
    if found is None:
        raise UnknownInstance(f"no host {ref!r:.80} in Placement")
    bars(found)
    return page(request, "host.html", who, host=found, instances=rows(who, uuid))


# -- the live stream --------------------------------------------------------------------------------

@router.get("/events")
async def events(request: Request, uuid: str | None = None, project: str | None = None) -> Response:
    """Server-sent events for the list (or, with ?uuid=, one instance's page): "update" with the
    page's data now and after every change; "gone" or "denied" end it (see live.stream)."""
    if uuid is not None and not contract.looks_like_uuid(uuid):
        raise UsageError(f"not an instance uuid: {uuid!r:.60}")
    await run_in_threadpool(caller, request, project)  # refuse before the stream starts: 401, 403
    hub = hub_of(request)
    await run_in_threadpool(hub.start)
    if uuid is not None:
        content = live.stream(hub, lambda: detail_payload(request, uuid), live.instance_keys(uuid),
                              every=live.GRAPHS)
    else:
        content = live.stream(hub, lambda: list_payload(request, project), live.instances_keys)
    return EventSourceResponse(content, ping=live.HEARTBEAT, headers={"Cache-Control": "no-store"})


# -- the application's hooks --------------------------------------------------------------------------

def mount(app: FastAPI) -> None:
    """Serve the static files; the watch starts with the first stream (hub_of), not here, so a
    server without dashboard viewers holds no watch."""
    app.mount("/ui/static", StaticFiles(directory=HERE / "static"), name="ui-static")
    app.state.ui_hub = None


def stop(app: FastAPI) -> None:
    """Stop the watch (at the server's shutdown)."""
    hub: live.Hub | None = getattr(app.state, "ui_hub", None)
    if hub is not None:
        hub.stop()

"""The REST API, /v1: eschedule's commands as resources. Each handler authorizes, calls one
Operations method (or catalog.py's) and returns what the CLI's --json prints; failures are the
CLI's errors as HTTP statuses (context.STATUS) with {"error": {"type", "message", "exit_code"}}.
An {uuid} in a path is what the CLI takes for an instance: its uuid, a unique uuid prefix or
its name; ?host= is a host's name or uuid."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response

from etcd_compute import contract
from etcd_compute.api import graphs
from etcd_compute.api.context import Caller, ErrorResponses, Server, bearer
from etcd_compute.api.schemas import (
    ActionBody,
    AttachBody,
    Destroyed,
    DetachBody,
    FlavorBody,
    GroupBody,
    ImageBody,
    QuotaBody,
    ScheduleBody,
    SnapshotBody,
    TokenInfo,
    VolumeBody,
)
from etcd_compute.contract import PUBLIC, Flavor, Group, Image, Quota, Usage, View, VolumeState, VolumeView
from etcd_compute.errors import UsageError
from etcd_compute.eschedule import catalog, inputs, snapshots
from etcd_compute.eschedule.volumes import Volumes

router = APIRouter(prefix="/v1", responses=ErrorResponses)


def server_of(request: Request) -> Server:
    return request.app.state.server


def caller(request: Request, project: Annotated[str | None, Query(description="admins: one project")] = None
           ) -> Caller:
    return server_of(request).caller(bearer(request), project)


Authorized = Annotated[Caller, Depends(caller)]


@router.get("/token", summary="The calling token: its id, project and role")
def whoami(who: Authorized) -> TokenInfo:
    return TokenInfo(**{k: v for k, v in who.token.items() if k != "sha256"})  # type: ignore[typeddict-item]


@router.get("/instances", summary="Instances (a member's: its project's; an admin's: all, or ?project=)")
def list_instances(who: Authorized,
                   state: Annotated[str | None, Query(description="ACTIVE, STOPPED, ... (any case)")] = None,
                   host: Annotated[str | None, Query(description="a host's name or uuid")] = None) -> list[View]:
    return who.ops.instances(host=host, state=state)


@router.post("/instances", status_code=201, summary="Schedule an instance (`eschedule QUERY [IMAGE]`)",
             response_model=View)
def schedule(body: ScheduleBody, request: Request) -> JSONResponse:
    who = server_of(request).caller(bearer(request), body.project)
    if body.project is not None:
        who.require_admin("schedule into another project")
    made = server_of(request).schedule(who, body.query, image=body.image, flavor=body.flavor, name=body.name,
                                       group=body.group, image_sha256=body.image_sha256, ssh_keys=body.ssh_keys,
                                       user_data=body.user_data, kernel=body.kernel, initrd=body.initrd,
                                       cmdline=body.cmdline, config_drive=body.config_drive)
    uuid = made["uuid"]
    view = (who.ops.wait_settled(uuid, body.timeout, ready=body.wait == "ready") if body.wait
            else contract.view(made, None))
    return JSONResponse(dict(view), 201, headers={"Location": f"/v1/instances/{uuid}"})


@router.get("/instances/{uuid}", summary="One instance, requested and actual state side by side")
def show(uuid: str, who: Authorized) -> View:
    return who.ops.show(uuid)


@router.delete("/instances/{uuid}", status_code=202, summary="Destroy an instance")
def destroy(uuid: str, who: Authorized, force: bool = False, wait: bool = False,
            timeout: Annotated[float | None, Query(gt=0, le=3600)] = None) -> Destroyed:
    if force:
        who.require_admin("destroy with force")
    uuid, host = who.ops.destroy(uuid, force)
    state = "DELETED" if force else "DELETING"
    if wait and not force:
        who.ops.wait_gone(uuid, timeout)
        state = "DELETED"
    return Destroyed(uuid=uuid, host=host, desired="deleted", state=state)


@router.post("/instances/{uuid}/action", summary="start | stop | suspend | resume | reboot (202; 200 waited)",
             response_model=View)
def act(uuid: str, body: ActionBody, who: Authorized) -> JSONResponse:
    who.ops.check_ready_wait(body.action, body.wait == "ready")  # before anything is written
    request = who.ops.act(body.action, uuid, stop_timeout=body.stop_timeout, force=body.force)
    if body.wait:
        view = who.ops.wait_acted(body.action, request, body.timeout, ready=body.wait == "ready")
        return JSONResponse(dict(view), 200)
    return JSONResponse(dict(who.ops.show(request["uuid"])), 202)


@router.post("/instances/{uuid}/snapshot", status_code=201, summary="Copy the instance's disk (in Ceph) into a "
             "new image of the project's catalogue, crash-consistent (`eschedule snapshot`)")
def snapshot(uuid: str, body: SnapshotBody, who: Authorized) -> Image:
    return snapshots.snapshot(who.ops, uuid, body.name)


@router.get("/instances/{uuid}/console", summary="The serial console (text; 204: none yet): the current boot's "
            "tail, ?boot=N that boot's head and tail, ?all=true every boot kept", response_class=Response)
def console(uuid: str, who: Authorized, boot: Annotated[int | None, Query(ge=1)] = None, all: bool = False
            ) -> Response:
    if boot is not None or all:
        if boot is not None and all:
            raise UsageError("?boot=N or ?all=true, not both")
        boots = who.ops.console_boots(uuid, boot)
        if not boots:
            return Response(status_code=204)
        return Response(contract.boots_bytes(boots, all), media_type="text/plain; charset=utf-8")
    found = who.ops.console(uuid)
    data, end = contract.console_bytes(found) if found is not None else (b"", 0)
    if found is None or not data:
        return Response(status_code=204)
    return Response(data, media_type="text/plain; charset=utf-8",
                    headers={"X-Console-End": str(end), "X-Console-Boot": str(found.get("boot", ""))})


@router.get("/instances/{uuid}/console/boots", summary="Each boot of the serial console kept: its number, when it "
            "began, its size, and its first and last 16 KiB as text")
def console_boots(uuid: str, who: Authorized) -> list[contract.BootView]:
    return [contract.boot_view(b) for b in who.ops.console_boots(uuid)]


@router.get("/instances/{uuid}/metrics", summary="The instance's CPU %, memory, network and disk rates over the "
            "last hour, from its host (empty series and a note when the host does not answer)")
def instance_metrics(uuid: str, who: Authorized) -> dict[str, Any]:
    return graphs.instance_history(who, uuid)


@router.get("/hosts", summary="Hosts with state, capacity and usage (admins)")
def hosts(who: Authorized) -> list[dict[str, Any]]:
    who.require_admin("list hosts")
    return who.ops.hosts()


@router.get("/usage", summary="The project's usage (Placement's) against its quota")
def usage(who: Authorized) -> Usage:
    return who.ops.usage()


@router.get("/quotas/{name}", summary="A project's usage against its quota (a member: its own project's)")
def get_quota(name: str, who: Authorized) -> Usage:
    if name != who.token["project"]:
        who.require_admin("see another project's quota")
    return who.ops.usage(inputs.check_project(name))


@router.put("/quotas/{name}", summary="Set or lift (null) limits of a project (admins)")
def set_quota(name: str, body: QuotaBody, who: Authorized) -> Quota:
    who.require_admin("set quotas")
    return who.ops.set_quota(name, dict(body.limits))


@router.get("/flavors", summary="Flavors: named sizes")
def flavors(who: Authorized) -> list[Flavor]:
    return who.ops.store.flavors()


@router.get("/flavors/{name}", summary="One flavor")
def flavor(name: str, who: Authorized) -> Flavor:
    return catalog.flavor(who.ops, name)


@router.post("/flavors", status_code=201, summary="Make a flavor (admins)")
def create_flavor(body: FlavorBody, who: Authorized) -> Flavor:
    who.require_admin("make flavors")
    return catalog.create_flavor(who.ops, body.name, body.resources, body.required, body.extra)


@router.delete("/flavors/{name}", summary="Delete a flavor (admins)")
def delete_flavor(name: str, who: Authorized) -> Flavor:
    who.require_admin("delete flavors")
    return catalog.delete_flavor(who.ops, name)


@router.get("/images", summary="The image catalogue: the project's own images and the public ones")
def images(who: Authorized) -> list[Image]:
    return catalog.images(who.ops)


@router.get("/images/{name}", summary="One image, by name or alias")
def image(name: str, who: Authorized) -> Image:
    return catalog.image(who.ops, name)


@router.post("/images", status_code=201, summary="Add an image to the project's catalogue (public: admins)")
def add_image(body: ImageBody, who: Authorized) -> Image:
    if body.public:
        who.require_admin("add public images")
    return catalog.add_image(who.ops, body.name, body.url, sha256=body.sha256, public=body.public,
                             aliases=body.aliases)


@router.delete("/images/{name}", summary="Delete an image and its aliases (public ones: admins)")
def delete_image(name: str, who: Authorized) -> Image:
    if catalog.image(who.ops, name)["scope"] == PUBLIC:
        who.require_admin("delete public images")
    return catalog.delete_image(who.ops, name)


@router.get("/groups", summary="Server groups of the project")
def groups(who: Authorized) -> list[Group]:
    return catalog.groups(who.ops)


@router.get("/groups/{name}", summary="One server group and where its members are")
def group(name: str, who: Authorized) -> dict[str, Any]:
    return catalog.spread(who.ops, catalog.find_group(who.ops, name)[0])


@router.post("/groups", status_code=201, summary="Make a server group of the project")
def create_group(body: GroupBody, who: Authorized) -> Group:
    return catalog.create_group(who.ops, body.name, body.policy, body.soft)


@router.delete("/groups/{name}", summary="Delete a server group without members")
def delete_group(name: str, who: Authorized) -> Group:
    return catalog.delete_group(who.ops, name)


@router.get("/volumes", summary="Volumes (a member's: its project's; an admin's: all, or ?project=)")
def volumes(who: Authorized) -> list[VolumeView]:
    return Volumes(who.ops).list()


@router.get("/volumes/{ref}", summary="One volume, by id, id prefix or name")
def volume(ref: str, who: Authorized) -> VolumeView:
    return Volumes(who.ops).show(ref)


@router.post("/volumes", status_code=201, summary="Make a volume in the Ceph pool (`eschedule volume create`)")
def create_volume(body: VolumeBody, who: Authorized) -> VolumeView:
    return Volumes(who.ops).create(body.size_gb, body.name)


@router.delete("/volumes/{ref}", summary="Delete a volume no instance has")
def delete_volume(ref: str, who: Authorized) -> contract.Volume:
    return Volumes(who.ops).delete(ref)


@router.post("/volumes/{ref}/attach", summary="Attach a volume to an instance (202; 200 waited)",
             response_model=VolumeView)
def attach_volume(ref: str, body: AttachBody, who: Authorized) -> JSONResponse:
    vols = Volumes(who.ops)
    found = vols.attach(ref, body.instance)
    if body.wait:
        return JSONResponse(dict(vols.wait(found["id"], VolumeState.IN_USE, body.timeout)), 200)
    return JSONResponse(dict(found), 202)


@router.post("/volumes/{ref}/detach", summary="Detach a volume from its instance (202; 200 waited)",
             response_model=VolumeView)
def detach_volume(ref: str, body: DetachBody, who: Authorized) -> JSONResponse:
    vols = Volumes(who.ops)
    found = vols.detach(ref)
    if body.wait:
        return JSONResponse(dict(vols.wait(found["id"], VolumeState.AVAILABLE, body.timeout)), 200)
    return JSONResponse(dict(found), 202)

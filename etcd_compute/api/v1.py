"""The REST API, /v1: eschedule's commands as resources. Each handler authorizes, calls one
Operations method and returns what the CLI's --json prints; failures are the CLI's errors
as HTTP statuses (app.STATUS) with {"error": {"type", "message", "exit_code"}}."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response

from etcd_compute import contract
from etcd_compute.api.app import Caller, ErrorResponses, Server, bearer
from etcd_compute.api.schemas import ActionBody, Destroyed, QuotaBody, ScheduleBody, TokenInfo
from etcd_compute.contract import Quota, Usage, View
from etcd_compute.errors import UsageError

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
def list_instances(who: Authorized, state: str | None = None, host: str | None = None) -> list[View]:
    return [v for v in who.ops.instances()
            if (state is None or v["state"] == state.upper()) and (host is None or v["host"] == host)]


@router.post("/instances", status_code=201, summary="Schedule an instance (`eschedule QUERY [IMAGE]`)",
             response_model=View)
def schedule(body: ScheduleBody, request: Request) -> JSONResponse:
    who = server_of(request).caller(bearer(request), body.project)
    if body.project is not None:
        who.require_admin("schedule into another project")
    made = server_of(request).schedule(who, body.query, image=body.image, image_sha256=body.image_sha256,
                                       ssh_keys=body.ssh_keys, user_data=body.user_data, kernel=body.kernel,
                                       initrd=body.initrd, cmdline=body.cmdline, config_drive=body.config_drive)
    uuid = made["uuid"]
    view = who.ops.wait_settled(uuid, body.timeout, body.wait == "ready") if body.wait else contract.view(made, None)
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
        return JSONResponse(dict(who.ops.wait_acted(body.action, request, body.timeout, body.wait == "ready")), 200)
    return JSONResponse(dict(who.ops.show(request["uuid"])), 202)


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
    if found is None:
        return Response(status_code=204)
    data, end = contract.console_bytes(found)
    return Response(data, media_type="text/plain; charset=utf-8",
                    headers={"X-Console-End": str(end), "X-Console-Boot": str(found.get("boot", ""))})


@router.get("/instances/{uuid}/console/boots", summary="Each boot of the serial console kept: its number, when it "
            "began, its size, and its first and last 16 KiB as text")
def console_boots(uuid: str, who: Authorized) -> list[contract.BootView]:
    return [contract.boot_view(b) for b in who.ops.console_boots(uuid)]


@router.get("/hosts", summary="Hosts with state, capacity and usage (admins)")
def hosts(who: Authorized) -> list[dict[str, Any]]:
    who.require_admin("list hosts")
    return who.ops.hosts()


@router.get("/usage", summary="The project's usage (Placement's) against its quota")
def usage(who: Authorized) -> Usage:
    return who.ops.usage()


@router.put("/quotas/{name}", summary="Set or lift (null) limits of a project (admins)")
def set_quota(name: str, body: QuotaBody, who: Authorized) -> Quota:
    who.require_admin("set quotas")
    return who.ops.set_quota(name, dict(body.limits))

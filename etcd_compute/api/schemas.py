"""The bodies the API takes and gives, as pydantic models: validated before any handler runs,
and described in the OpenAPI document from the same classes."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from typing_extensions import TypedDict

from etcd_compute.states import Command


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not a silent default


class ScheduleBody(Strict):
    query: str | None = Field(None, description="Placement's allocation-candidates query, as for `eschedule QUERY` "
                              "(or `flavor`)", examples=["resources=VCPU:1,MEMORY_MB:256,DISK_GB:1"])
    flavor: str | None = Field(None, description="a flavor's name (GET /v1/flavors) instead of `query`")
    name: str | None = Field(None, description="the instance's name: unique in its project, its guest's hostname "
                             "(a DNS label)")
    group: str | None = Field(None, description="a server group of the project (GET /v1/groups) whose rule it follows")
    image: str | None = Field(None, description="an image of the catalogue (GET /v1/images) by name or alias, or a URL "
                              "or path on the hosts (default: schedule.yaml's)")
    image_sha256: str | None = None
    ssh_keys: list[str] = Field(default_factory=list, description="OpenSSH public key lines (at most 32)")
    user_data: str | None = Field(None, description="cloud-init user-data")
    kernel: str | None = Field(None, description="boot this kernel directly (URL or path on the hosts), "
                                                 "as `eschedule --kernel`")
    initrd: str | None = Field(None, description="initrd for `kernel`")
    cmdline: str | None = Field(None, description="kernel command line for `kernel`")
    config_drive: bool = Field(True, description="false: no config drive, the metadata server alone "
                                                 "(`eschedule --no-config-drive`)")
    project: str | None = Field(None, description="admins only: the project to schedule into")
    wait: bool | Literal["running", "ready"] = Field(
        False, description="answer once the instance is ACTIVE (with its address) or failed: true or \"running\"; "
                           "\"ready\": once its guest has also said it booted (cloud-init done)")
    timeout: float | None = Field(None, gt=0, le=3600)


class ActionBody(Strict):
    action: Command
    wait: bool | Literal["running", "ready"] = Field(False, description="as for a schedule (\"ready\": start, "
                                                                       "resume and reboot)")
    timeout: float | None = Field(None, gt=0, le=3600, description="seconds to wait (with `wait`)")
    stop_timeout: float | None = Field(None, gt=0, le=3600, description="stop, reboot: seconds the guest has to "
                                       "shut down cleanly before it is powered off (default: the host's)")
    force: bool = Field(False, description="stop, reboot: power the guest off at once, without a clean shutdown")


class QuotaBody(Strict):
    limits: dict[str, int | None] = Field(description="'instances' or a resource class -> limit (null lifts it)",
                                          examples=[{"instances": 10, "VCPU": 16, "MEMORY_MB": None}])


class ErrorBody(BaseModel):
    error: dict[str, Any] = Field(description="type, message and the CLI's exit code for the same failure")


class TokenInfo(TypedDict):
    id: str
    project: str
    role: str
    name: str
    created_at: str


class Destroyed(TypedDict):
    uuid: str
    host: str
    desired: str
    state: str  # DELETING (the host is at it), DELETED (waited, or forced)


class FlavorBody(Strict):
    name: str
    resources: dict[str, int] = Field(examples=[{"VCPU": 2, "MEMORY_MB": 2048, "DISK_GB": 20}])
    required: list[str] = Field(default_factory=list, description="traits the host must have (!TRAIT: must not)")
    extra: str | None = Field(None, description="more of Placement's query, e.g. member_of=AGG")


class ImageBody(Strict):
    name: str
    url: str = Field(description="an http(s):// or file:// URL or a path on the hosts (in their image_dirs)")
    sha256: str | None = Field(None, description="its content's sha256 (default: taken from the content, read or "
                               "downloaded by the API server)")
    public: bool = Field(False, description="admins only: seen by every project")
    aliases: list[str] = Field(default_factory=list)


class GroupBody(Strict):
    name: str
    policy: Literal["anti-affinity", "affinity"]
    soft: bool = Field(False, description="a preference, not a rule")


class VolumeBody(Strict):
    size_gb: int = Field(description="its size in GiB (`eschedule volume create SIZE_GB`)", ge=1)
    name: str | None = Field(None, description="its name, unique in the project")


class AttachBody(Strict):
    instance: str = Field(description="the instance: its uuid, a unique uuid prefix or its name")
    wait: bool = Field(False, description="answer once its host has attached it")
    timeout: float | None = Field(None, gt=0, le=3600)


class DetachBody(Strict):
    wait: bool = Field(False, description="answer once its host has detached it")
    timeout: float | None = Field(None, gt=0, le=3600)


class SnapshotBody(Strict):
    name: str | None = Field(None, description="the new image's name in the project's catalogue (default: the "
                             "instance's name or id and the UTC time)")

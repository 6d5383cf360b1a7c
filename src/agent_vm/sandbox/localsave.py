"""What a local sandbox writes down when it pauses, and reads back in another process
(a restarted server, ``AsyncSandbox.connect``): its id, request, labels, lifetime, the
front door's own notes (``keep``: a server's owner), and its parent if it was forked.
Also the public shape of a snapshot. The secrets of a request are never part of it."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Protocol

from agent_vm.communication.workspace import Workspace
from agent_vm.core.template import ResourceProfile
from agent_vm.execution.snapshots import SnapshotMeta
from agent_vm.execution.suspend import PausedMeta
from agent_vm.network.policy import EgressPolicy
from agent_vm.sandbox.base import SandboxSpec, SnapshotInfo


class Saved(Protocol):
    """What of a ``LocalSandbox`` is written down."""

    id: str
    spec: SandboxSpec
    created_at: datetime
    pooled: bool
    parent: str | None
    keep: dict[str, Any]

    def running_commands(self) -> list[dict[str, Any]]: ...


def record(handle: Saved) -> dict[str, Any]:
    spec = handle.spec
    profile = spec.profile if isinstance(spec.profile, str) else spec.profile.model_dump()
    workspace = spec.workspace.model_dump(mode="json") if spec.workspace is not None else None
    return {
        "id": handle.id,
        "created_at": handle.created_at.isoformat(),
        "pooled": handle.pooled,
        "parent": handle.parent,
        "keep": handle.keep,
        "commands": handle.running_commands(),
        "spec": {
            "image": spec.image,
            "profile": profile,
            "network": spec.network,
            "workspace": workspace,
            "labels": dict(spec.labels),
            "lifetime": spec.lifetime,
            "anomaly_action": spec.anomaly_action,
            "on_expiry": spec.on_expiry,
            "auto_resume": spec.auto_resume,
        },
    }


def spec_from(meta: PausedMeta) -> SandboxSpec:
    data: dict[str, Any] = dict(meta.owner.get("spec") or {})
    profile = data.get("profile", "light")
    workspace = data.get("workspace")
    return SandboxSpec(
        image=data.get("image"),
        profile=profile if isinstance(profile, str) else ResourceProfile.model_validate(profile),
        network=str(data.get("network", "nat")),
        policy=EgressPolicy.model_validate(meta.policy) if meta.policy is not None else None,
        workspace=Workspace.model_validate(workspace) if workspace is not None else None,
        labels={str(k): str(v) for k, v in (data.get("labels") or {}).items()},
        lifetime=float(data.get("lifetime", 3600.0)),
        anomaly_action=data.get("anomaly_action"),
        on_expiry=str(data.get("on_expiry", "kill")),
        auto_resume=bool(data.get("auto_resume", False)),
    )


def snapshot_info(meta: SnapshotMeta) -> SnapshotInfo:
    mode = meta.spec.network_mode.value
    network = {"nat_filtered": "nat", "bridge": f"bridge:{meta.spec.bridge}"}.get(mode, mode)
    profile = next(
        (name for name, (cpus, memory) in ResourceProfile.PRESETS.items()
         if (cpus, memory) == (meta.spec.profile.vcpu, meta.spec.profile.memory_mib)),
        "custom",
    )  # fmt: skip
    return SnapshotInfo(
        meta.name, meta.created_at, meta.image_name, profile, network, meta.source,
        meta.ram_bytes, meta.disk_bytes, meta.pause_seconds,
    )  # fmt: skip

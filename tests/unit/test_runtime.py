"""The runtime's choices without libvirt: accelerator, hardware checks, image lookup.

A Runtime connects to nothing until started, so what it decides from the host (KVM or
TCG, what a VM may ask for) and from the image store is testable with prepared files.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from agent_vm.config import Settings
from agent_vm.core.template import NetworkMode, ResourceProfile
from agent_vm.errors import ConfigError, ImageNotFoundError
from agent_vm.execution.pool import VMPool
from agent_vm.execution.runtime import Runtime
from agent_vm.host.accel import Accel
from agent_vm.host.resources import HostResources
from agent_vm.sandbox import AsyncSandbox
from tests.unit.test_accel import host

BIG_HOST = HostResources(cpus=16, memory_total_mib=65536, memory_available_mib=60000)


def settings(tmp_path: Path) -> Settings:
    return Settings(state_dir=tmp_path / "state", shm_dir=tmp_path / "shm")


def runtime(tmp_path: Path, *, kvm: bool, resources: HostResources = BIG_HOST) -> Runtime:
    facts = tmp_path / "host"
    facts.mkdir()
    paths = (
        host(facts, flags="vmx", modules=["kvm", "kvm_intel"], dev_kvm=True)
        if kvm
        else host(facts, flags="", modules=["kvm", "kvm_pvm"], dev_kvm=True)
    )
    return Runtime(settings(tmp_path), host=paths, resources=lambda: resources)


def test_kvm_is_chosen_for_every_entry_point_where_detection_says_so(tmp_path: Path) -> None:
    rt = runtime(tmp_path, kvm=True)
    assert rt.accel.accel is Accel.KVM
    assert rt.spec().accel is Accel.KVM
    assert rt.spec(profile="intensive", network="isolated").accel is Accel.KVM
    assert VMPool(runtime=rt).spec.accel is Accel.KVM  # the README's pool example
    assert rt.spec(profile=ResourceProfile(vcpu=1)).accel is Accel.KVM  # a sandbox's own
    AsyncSandbox(runtime=rt)  # checked against this host's accelerator, nothing started


def test_pvm_backed_dev_kvm_means_tcg_everywhere(tmp_path: Path) -> None:
    rt = runtime(tmp_path, kvm=False)
    assert rt.accel.accel is Accel.TCG and "PVM" in rt.accel.reason
    assert VMPool(runtime=rt).spec.accel is Accel.TCG


def test_pool_takes_the_sandboxes_simple_arguments(tmp_path: Path) -> None:
    rt = runtime(tmp_path, kvm=True)
    pool = VMPool(1, 2, runtime=rt, profile="standard", network="isolated")
    assert pool.spec.profile == ResourceProfile.standard()
    assert pool.spec.network_mode is NetworkMode.ISOLATED
    bridged = VMPool(runtime=rt, network="bridge:br0")
    assert (bridged.spec.network_mode, bridged.spec.bridge) == (NetworkMode.BRIDGE, "br0")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"cpus": 0}, "at least 1"),
        ({"cpus": -3}, "at least 1"),
        ({"cpus": 17}, "this host has 16 CPUs"),
        ({"memory_mib": 64}, "at least 128 MiB"),
        ({"memory_mib": 70000}, "this host has 60000 MiB available"),
        ({"disk_gib": 1}, "--disk must be at least 2 GiB"),
        ({"profile": "huge"}, "unknown profile 'huge'"),
        ({"network": "wifi"}, "network must be nat, isolated or bridge:NAME"),
        ({"network": "bridge:"}, "network must be"),
    ],
)
def test_hardware_the_host_cannot_give_is_refused_with_the_figure(
    tmp_path: Path, options: dict[str, object], message: str
) -> None:
    rt = runtime(tmp_path, kvm=True)
    with pytest.raises(ConfigError, match=message):
        rt.spec(**options)  # type: ignore[arg-type]


def test_an_image_that_was_never_built_is_an_error_naming_the_build_command(
    tmp_path: Path,
) -> None:
    rt = runtime(tmp_path, kvm=True)
    with pytest.raises(ImageNotFoundError) as caught:
        rt.find_image("myimage")
    assert caught.value.hint is not None
    assert "agent-vm image build --name myimage" in caught.value.hint
    assert not (tmp_path / "state" / "images" / "myimage").exists()  # nothing was built


def test_bad_sandbox_arguments_fail_before_anything_starts(tmp_path: Path) -> None:
    rt = runtime(tmp_path, kvm=True)
    with pytest.raises(ConfigError):
        AsyncSandbox(runtime=rt, profile="enormous")
    with pytest.raises(ConfigError):
        VMPool(3, 1, runtime=rt)
    assert not rt.connection.is_connected()


def test_overrides_keep_the_rest_of_a_given_profile(tmp_path: Path) -> None:
    rt = runtime(tmp_path, kvm=True)
    profile = ResourceProfile(disk_gib=5, pids_max=64, cpu_cores=0.5)
    spec = rt.spec(profile=profile, cpus=2, memory_mib=1024)
    assert (spec.profile.vcpu, spec.profile.memory_mib) == (2, 1024)
    assert (spec.profile.disk_gib, spec.profile.pids_max, spec.profile.cpu_cores) == (5, 64, 0.5)
    assert rt.spec(profile=profile, disk_gib=8).profile.disk_gib == 8


def test_limits_are_not_part_of_a_golden_states_key(tmp_path: Path) -> None:
    from agent_vm.execution.golden import GoldenKey

    rt = runtime(tmp_path, kvm=True)
    limited = rt.spec(profile=ResourceProfile(pids_max=64, disk_mbps=10))
    assert (
        GoldenKey(image_key="i", spec=limited).digest()
        == GoldenKey(image_key="i", spec=rt.spec()).digest()
    )
    bigger = rt.spec(profile=ResourceProfile(disk_gib=4))  # the guest's disk: part of it
    assert (
        GoldenKey(image_key="i", spec=bigger).digest()
        != GoldenKey(image_key="i", spec=rt.spec()).digest()
    )
    assert ResourceProfile().unlimited().host_memory_mib(tcg=True) is None

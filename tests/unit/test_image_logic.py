"""Pure logic of the image builder: mirror detection, module closure, vmlinux extraction."""

from __future__ import annotations

import gzip
import lzma
from pathlib import Path

import pytest

from agent_vm.errors import ImageError
from agent_vm.image.kernel import extract_vmlinux, module_closure
from agent_vm.image.manifest import BuildInputs
from agent_vm.image.mirror import detect_distro, image_sources


def write_release(tmp: Path, distro: str, codename: str) -> Path:
    path = tmp / "os-release"
    path.write_text(f'ID={distro}\nVERSION_CODENAME={codename}\nPRETTY_NAME="x"\n')
    return path


def deb822(tmp_path: Path, text: str) -> Path:
    """An /etc/apt with one deb822 sources file holding ``text``."""
    apt = tmp_path / "apt"
    (apt / "sources.list.d").mkdir(parents=True)
    (apt / "sources.list.d" / "debian.sources").write_text(text)
    return apt


def test_mirror_from_deb822_sources(tmp_path: Path) -> None:
    apt = deb822(
        tmp_path,
        "Types: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm bookworm-updates\n"
        "Components: main\n\nTypes: deb\nURIs: http://security.example/\n"
        "Suites: bookworm-security\nComponents: main\n",
    )
    distro = detect_distro(write_release(tmp_path, "debian", "bookworm"), apt)
    assert (distro.id, distro.codename, distro.mirror) == (
        "debian",
        "bookworm",
        "http://mirror.example/debian",
    )


def test_images_list_the_hosts_updates_and_security_suites(tmp_path: Path) -> None:
    apt = deb822(
        tmp_path,
        "Types: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm bookworm-updates\n"
        "Components: main contrib\n\nTypes: deb\nURIs: http://security.example/\n"
        "Suites: bookworm-security\nComponents: main\n\n"
        "Types: deb\nURIs: http://other.example/\nSuites: stable\nComponents: main\n",
    )
    distro = detect_distro(write_release(tmp_path, "debian", "bookworm"), apt)
    same = [s.line() for s in image_sources(distro, "bookworm", distro.mirror)]
    assert same == [
        "deb http://mirror.example/debian bookworm bookworm-updates main contrib",
        "deb http://security.example bookworm-security main",
    ]
    # another release on this host: the same suites, renamed; the build's mirror for it
    newer = [s.line() for s in image_sources(distro, "trixie", "http://m2.example/debian")]
    assert newer == [
        "deb http://m2.example/debian trixie trixie-updates main contrib",
        "deb http://security.example trixie-security main",
    ]


def test_without_host_sources_an_image_lists_its_release(tmp_path: Path) -> None:
    apt = tmp_path / "apt"
    apt.mkdir()
    distro = detect_distro(write_release(tmp_path, "debian", "bookworm"), apt)
    lines = [s.line() for s in image_sources(distro, "bookworm", distro.mirror)]
    assert lines == ["deb http://deb.debian.org/debian bookworm main"]


def test_mirror_from_one_line_sources(tmp_path: Path) -> None:
    apt = tmp_path / "apt"
    apt.mkdir()
    (apt / "sources.list").write_text(
        "# comment\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://archive.example/ubuntu noble main universe\n"
    )
    distro = detect_distro(write_release(tmp_path, "ubuntu", "noble"), apt)
    assert distro.mirror == "http://archive.example/ubuntu"


def test_mirror_falls_back_to_the_official_one(tmp_path: Path) -> None:
    apt = tmp_path / "apt"
    apt.mkdir()
    assert detect_distro(write_release(tmp_path, "debian", "bookworm"), apt).mirror.startswith(
        "http://deb.debian.org"
    )


def test_unsupported_distribution_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="unsupported host distribution"):
        detect_distro(write_release(tmp_path, "fedora", "x"), tmp_path)


def test_module_closure_orders_dependencies_first(tmp_path: Path) -> None:
    (tmp_path / "modules.dep").write_text(
        "kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko\n"
        "kernel/fs/jbd2/jbd2.ko:\nkernel/fs/mbcache.ko:\nkernel/lib/crc16.ko:\n"
        "kernel/drivers/char/hw_random/virtio-rng.ko: kernel/drivers/virtio/virtio.ko\n"
        "kernel/drivers/virtio/virtio.ko:\n"
    )
    (tmp_path / "modules.builtin").write_text("kernel/drivers/virtio/virtio_ring.ko\n")
    names = [n for n, _ in module_closure(tmp_path, ["ext4", "virtio-rng", "virtio_ring"])]
    assert names.index("jbd2") < names.index("ext4")
    assert names.index("crc16") < names.index("ext4")
    assert names.index("virtio") < names.index("virtio_rng")
    assert "virtio_ring" not in names  # built in
    with pytest.raises(ImageError, match="not found"):
        module_closure(tmp_path, ["nope"])


@pytest.mark.parametrize("compress", [lzma.compress, gzip.compress])
def test_extract_vmlinux_from_a_bzimage_like_blob(compress: object) -> None:
    elf = b"\x7fELF" + bytes(range(256)) * 40
    blob = b"MZ-setup-code" * 50 + compress(elf) + b"trailing-bytes" * 10  # type: ignore[operator]
    assert extract_vmlinux(blob) == elf


def test_extract_vmlinux_gives_none_without_a_payload() -> None:
    assert extract_vmlinux(b"no compressed kernel here") is None


def test_input_key_changes_with_guest_code() -> None:
    base = dict(
        distro="debian",
        suite="bookworm",
        mirror="m",
        packages=["a"],
        kernel_package="k",
        kernel_version="1",
        boot_modules=["x"],
        late_modules=["y"],
        cmdline="console=ttyS0",
    )
    one = BuildInputs(**base, guest_code="1")
    two = BuildInputs(**base, guest_code="2")
    assert one.key() != two.key()
    assert one.rootfs_key() == two.rootfs_key()  # the debootstrap tree is reused

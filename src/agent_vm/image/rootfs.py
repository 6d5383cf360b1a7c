"""The guest's root filesystem tree: debootstrap, trimmed, with agent-vm's guest code.

Nothing in this tree starts a service: the guest runs agent-vm's own init, not systemd,
so no NTP client, apt timer or telemetry can reach the network on its own.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from agent_vm.errors import ImageError
from agent_vm.guest.process import EGRESS_CA
from agent_vm.version import __version__

GUEST_PACKAGES = [
    "python3",
    "bash",
    "coreutils",
    "git",
    "curl",
    "ca-certificates",
    "iproute2",
    "procps",
    "netbase",
    "e2fsprogs",  # resize2fs grows the root file system (no longer in trixie's minbase)
    "sudo",  # E2B's convention: its user `user` may become root (the VM is the boundary)
    "python-is-python3",  # `python`, as E2B's templates and much code expect
]
AGENT_UID = 1000
E2B_USER, E2B_UID = "user", 1001  # the user E2B's SDK acts as by default (api/e2b)
GUEST_LIB = Path("opt/agent-vm")

# Files of the host package that the guest runs (all standard library only).
GUEST_SOURCES = [
    "errors.py",
    "protocol/__init__.py",
    "protocol/record.py",
    "protocol/frame.py",
    "protocol/messages.py",
    "protocol/configure.py",
    "protocol/ports.py",
    "protocol/files.py",
    "guest/__init__.py",
    "guest/defaults.py",
    "guest/files.py",
    "guest/filebits.py",
    "guest/unpin.py",
    "guest/fileserver.py",
    "guest/inotify.py",
    "guest/workspace.py",
    "guest/netconf.py",
    "guest/link.py",
    "guest/wire.py",
    "guest/cgroups.py",
    "guest/process.py",
    "guest/agent.py",
    "guest/init.py",
]
TRIM = [
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/lintian",
    "var/cache/apt",
    "var/lib/apt/lists",
    "var/log",
]

Progress = Callable[[str], None]


def guest_code_hash() -> str:
    """Changes whenever any file that ends up in the guest changes."""
    digest = hashlib.sha256()
    package = resources.files("agent_vm")
    for rel in [*GUEST_SOURCES, "guest/initramfs-init.sh"]:
        digest.update(rel.encode() + b"\0" + package.joinpath(rel).read_bytes())
    digest.update(__version__.encode())
    return digest.hexdigest()


def debootstrap(suite: str, mirror: str, target: Path, progress: Progress) -> None:
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    argv = [
        "debootstrap",
        "--variant=minbase",
        f"--include={','.join(GUEST_PACKAGES)}",
        suite,
        str(target),
        mirror,
    ]
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    except FileNotFoundError as exc:
        raise ImageError(
            "debootstrap is not installed", hint="apt-get install debootstrap"
        ) from exc
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        tail = [*tail[-19:], line]
        if line.startswith("I: "):
            progress(f"debootstrap: {line[3:]}")
    if proc.wait() != 0:
        raise ImageError(
            f"debootstrap {suite} from {mirror} failed:\n" + "\n".join(tail),
            hint="check that the mirror is reachable (it is the one in /etc/apt/sources.list)",
        )


def upgrade(tree: Path, sources: list[str], progress: Progress) -> None:
    """List the host's suites (updates, security) in the tree and install their fixes.

    Runs in a plain chroot with the host's network, like debootstrap before it: the tree
    is debootstrap's own output, nothing of a user's runs here yet.
    """
    if not sources:
        return
    (tree / "etc/apt/sources.list").write_text("\n".join(sources) + "\n")
    shutil.copyfile("/etc/resolv.conf", tree / "etc/resolv.conf")
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "DEBIAN_FRONTEND": "noninteractive",
        "LANG": "C.UTF-8",
    }
    for argv in (
        ["apt-get", "update", "-q"],
        ["apt-get", "upgrade", "-y", "-q", "--with-new-pkgs"],
        ["apt-get", "clean"],
    ):
        proc = subprocess.run(
            ["chroot", str(tree), *argv], env=env, capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            raise ImageError(
                f"{' '.join(argv)} in the new image failed:\n{proc.stderr.strip()[-1500:]}",
                hint="check that the mirrors in /etc/apt are reachable",
            )
        progress(f"{' '.join(argv[:2])}: done")


def trim(tree: Path) -> None:
    for rel in TRIM:
        path = tree / rel
        if path.is_dir():
            shutil.rmtree(path)
            path.mkdir(mode=0o755)


def configure(tree: Path) -> None:
    """Settings that belong to the tree itself rather than to one boot: agent-vm's user
    ``agent``, and E2B's ``user`` (with passwordless sudo, as E2B's base template)."""
    passwd = (tree / "etc/passwd").read_text()
    for name, uid in (("agent", AGENT_UID), (E2B_USER, E2B_UID)):
        if f"\n{name}:" not in passwd:
            subprocess.run(
                ["chroot", str(tree), "useradd", "-m", "-u", str(uid), "-s", "/bin/bash", name],
                check=True, capture_output=True,
            )  # fmt: skip
    profile = tree / "etc/profile"  # a login shell (E2B runs every command in one) asks
    if profile.exists():  # `id -u` for the uid: bash knows it ($EUID), one exec less
        text = profile.read_text()
        profile.write_text(text.replace('"$(id -u)"', '"${EUID:-$(id -u)}"'))
    sudoers = tree / "etc/sudoers.d/e2b-user"
    sudoers.write_text(f"{E2B_USER} ALL=(ALL:ALL) NOPASSWD: ALL\n")
    sudoers.chmod(0o440)
    (tree / "etc/resolv.conf").write_text("")  # set per network mode at boot
    (tree / "etc/fstab").write_text("# root is mounted by agent-vm's initramfs\n")
    (tree / "etc/hostname").write_text("agent-vm\n")


def installed_packages(tree: Path) -> list[str]:
    out = subprocess.run(
        ["chroot", str(tree), "dpkg-query", "-W", "-f=${Package}=${Version}\n"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return sorted(out.split())


def install_egress_ca(tree: Path, cert: bytes) -> None:
    """The host's egress proxy CA, trusted by the guest's system store (OpenSSL, curl,
    Python's ssl); ``guest/process.py`` points Node and requests at it too. Only the
    certificate: its key never leaves the host."""
    target = tree / EGRESS_CA.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(cert)
    subprocess.run(
        ["chroot", str(tree), "update-ca-certificates", "--fresh"],
        check=True, capture_output=True,
    )  # fmt: skip


def install_guest_code(tree: Path, late_modules: list[tuple[str, bytes]]) -> None:
    """Copy the guest code and late-loaded modules into the tree, then byte-compile."""
    lib = tree / GUEST_LIB
    if lib.exists():
        shutil.rmtree(lib)
    package = resources.files("agent_vm")
    for rel in GUEST_SOURCES:
        dest = lib / "agent_vm" / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(package.joinpath(rel).read_bytes())
    (lib / "agent_vm/__init__.py").write_text(
        f'"""agent-vm guest copy."""\n\n__version__ = "{__version__}"\n'
    )
    bin_dir = lib / "bin"
    bin_dir.mkdir()
    shutil.copy2("/bin/busybox", bin_dir / "busybox")  # udhcpc for BRIDGE mode (static)
    from agent_vm.guest.netconf import udhcpc_script

    (bin_dir / "udhcpc.sh").write_text(udhcpc_script())
    (bin_dir / "udhcpc.sh").chmod(0o755)
    modules = lib / "modules"
    modules.mkdir()
    for name, data in late_modules:
        (modules / f"{name}.ko").write_bytes(data)
    (modules / "order").write_text("\n".join(name for name, _ in late_modules) + "\n")
    # Compile with the guest's own interpreter; every VM boots from a fresh overlay, so
    # bytecode compiled at boot would be paid again by every VM.
    subprocess.run(
        ["chroot", str(tree), "python3", "-m", "compileall", "-q", f"/{GUEST_LIB}"],
        check=True,
        capture_output=True,
    )

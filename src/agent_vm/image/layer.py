"""The host half of a recipe build: run the recipe's steps over the base tree, keep the
difference as a tar plus a list of deletions.

The steps run in a chroot of an overlay (lower: the base image's tree, upper: the layer),
confined by bubblewrap the way a container build is: its own PID, IPC and UTS
namespaces, no new privileges, and root's capabilities cut to the ones package managers
use (no CAP_SYS_ADMIN, CAP_SYS_MODULE, CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH, CAP_MKNOD,
CAP_NET_ADMIN/RAW). It shares the host's network: this is where apt, pip and npm reach
their registries, and the only time they do. The host's CA bundle and resolver are bound
in for the build only; nothing of the host ends up in the layer.

Why not build inside a VM: under TCG (these hosts) pip and npm run 10-20x slower; a
recipe is the user's own code, trusted like a Dockerfile, while what runs *from* the
image is not. The VM half (``execution/layers.py``) writes the tar into a qcow2 layer.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent_vm.errors import ImageError
from agent_vm.host.mounts import remove_tree, unmount_under
from agent_vm.image.recipe import LoadedRecipe
from agent_vm.image.rootfs import GUEST_LIB, TRIM
from agent_vm.logs import get_logger
from agent_vm.protocol.ports import IMAGE_DEFAULTS

log = get_logger(__name__)

Progress = Callable[[str], None]

# Docker's default set minus CAP_MKNOD and CAP_NET_RAW
CAPABILITIES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL", "CAP_SETGID",
    "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT",
    "CAP_AUDIT_WRITE",
)  # fmt: skip
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
BUILD_CA = "/run/agent-vm-build/ca.crt"
STAGED = "/run/agent-vm-build/files"
KERNEL_MODULES = "/run/agent-vm-build/modules"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
STEP_TIMEOUT = 3600.0
OPAQUE_XATTR = "trusted.overlay.opaque"
NO_DAEMONS = "#!/bin/sh\n# agent-vm recipe build: no service starts in the chroot\nexit 101\n"


@dataclass(frozen=True)
class LayerTree:
    """What the recipe changed: ``tar`` (new and changed entries) and ``deletions`` (NUL-
    separated absolute paths to remove first)."""

    tar: Path
    deletions: Path
    tar_bytes: int
    entries: int
    removed: int


@dataclass(frozen=True)
class Step:
    label: str
    script: str


def steps(
    loaded: LoadedRecipe, modules: list[str] | None = None, release: str | None = None
) -> list[Step]:
    """The recipe as shell scripts, in the order a Dockerfile author would expect:
    packages, then files, then the recipe's own commands, then clean-up. ``modules`` are
    the kernel modules staged for the recipe (its ``[kernel]`` list and their dependencies,
    in load order); ``release`` the kernel's, when its whole module tree is installed."""
    recipe = loaded.recipe
    out = [Step("policy", f"printf %s {shlex.quote(NO_DAEMONS)} > /usr/sbin/policy-rc.d && "
                          "chmod 755 /usr/sbin/policy-rc.d")]  # fmt: skip
    apt = recipe.apt_packages()
    if apt:
        out.append(
            Step(
                f"apt: {' '.join(apt)}",
                "apt-get update -q && apt-get install -y -q --no-install-recommends "
                + " ".join(shlex.quote(p) for p in apt),
            )
        )
    if recipe.pip.packages:
        packages = " ".join(shlex.quote(p) for p in recipe.pip.packages)
        if recipe.pip.venv:
            venv = shlex.quote(recipe.pip.venv)
            script = (
                f"python3 -m venv {venv} && {venv}/bin/pip install -q --no-cache-dir "
                f"--progress-bar off {packages}"
            )
        else:
            script = (
                "pip install -q --no-cache-dir --progress-bar off --break-system-packages "
                + packages
            )
        out.append(Step(f"pip: {' '.join(recipe.pip.packages)}", script))
    if recipe.npm.packages:
        out.append(
            Step(
                f"npm: {' '.join(recipe.npm.packages)}",
                "npm install -g --no-fund --no-audit --no-update-notifier --loglevel=error "
                + " ".join(shlex.quote(p) for p in recipe.npm.packages),
            )
        )
    if modules:
        names = " ".join(modules)
        out.append(
            Step(
                f"kernel modules: {names}",
                f"for m in {names}; do install -m 0644 {STAGED}/modules/$m.ko "
                f"/{GUEST_LIB}/modules/$m.ko; echo $m >> /{GUEST_LIB}/modules/order; done",
            )
        )
    if release is not None:
        out.append(
            Step(
                f"kernel module tree: /lib/modules/{release}",
                f"mkdir -p /lib/modules && rm -rf /lib/modules/{release} && "
                f"cp -a {KERNEL_MODULES} /lib/modules/{release}",
            )
        )
    for index, copy in enumerate(recipe.files):
        out.append(
            Step(
                f"file: {copy.dest}",
                f"install -D -m {copy.mode} {STAGED}/{index} {shlex.quote(copy.dest)}",
            )
        )
    out.append(Step("image defaults", f"install -D -m 0644 {STAGED}/defaults {IMAGE_DEFAULTS}"))
    for command in recipe.run:
        out.append(Step(f"run: {command}", command))
    trimmed = " ".join(f"/{rel}/*" for rel in TRIM)
    out.append(
        Step(
            "clean-up",
            "rm -f /usr/sbin/policy-rc.d; (apt-get clean || true); "
            f"rm -rf {trimmed} /root/.npm /root/.cache /tmp/* /var/tmp/*",
        )
    )
    return out


def defaults_json(loaded: LoadedRecipe) -> str:
    recipe = loaded.recipe
    return json.dumps({"user": recipe.user, "workdir": recipe.workdir, "env": recipe.env}) + "\n"


def _bwrap(root: Path, staged: Path) -> list[str]:
    argv = [
        "bwrap", "--bind", str(root), "/", "--proc", "/proc", "--dev", "/dev",
        "--perms", "1777", "--tmpfs", "/tmp", "--tmpfs", "/run",
        "--ro-bind", "/etc/resolv.conf", "/etc/resolv.conf",
        "--ro-bind", str(HOST_CA), BUILD_CA, "--ro-bind", str(staged), STAGED,
        "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
        "--die-with-parent", "--new-session", "--cap-drop", "ALL",
    ]  # fmt: skip
    for cap in CAPABILITIES:
        argv += ["--cap-add", cap]
    env = {
        "PATH": PATH,
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "DEBIAN_FRONTEND": "noninteractive",
        "SSL_CERT_FILE": BUILD_CA,
        "PIP_CERT": BUILD_CA,
        "REQUESTS_CA_BUNDLE": BUILD_CA,
        "NODE_EXTRA_CA_CERTS": BUILD_CA,
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "npm_config_update_notifier": "false",
    }
    argv.append("--clearenv")
    for key, value in env.items():
        argv += ["--setenv", key, value]
    return argv


def _run_step(argv: list[str], step: Step, progress: Progress) -> None:
    progress(step.label)
    try:
        proc = subprocess.Popen(
            [*argv, "/bin/sh", "-ec", step.script],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
        )
    except FileNotFoundError as exc:
        raise ImageError(
            "bubblewrap is not installed (recipe builds run in it)",
            hint="run ./agent-vm once (it installs the packages) or apt-get install bubblewrap",
        ) from exc
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        tail = [*tail[-29:], line.rstrip()]
    try:
        code = proc.wait(timeout=STEP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait()
    if code != 0:
        raise ImageError(
            f"recipe step failed ({step.label}), exit code {code}:\n" + "\n".join(tail),
            hint="fix the recipe and build again; the steps before it are not kept",
        )


def _mount_overlay(lower: Path, upper: Path, work: Path, root: Path) -> None:
    options = f"lowerdir={lower},upperdir={upper},workdir={work}"
    proc = subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", options, str(root)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise ImageError(
            f"cannot mount the build overlay: {proc.stderr.strip()}",
            hint="recipe builds need overlayfs on the host (modprobe overlay)",
        )


def _scan(upper: Path) -> tuple[list[str], list[str]]:
    """Entries to put in the tar and absolute paths to delete first. A whiteout (char
    device 0:0) deletes what the base had; an opaque directory replaces the base's one."""
    keep: list[str] = []
    delete: list[str] = []
    for dirpath, dirnames, filenames in os.walk(upper):
        directory = Path(dirpath)
        for name in [*dirnames, *filenames]:
            full = directory / name
            rel = str(full.relative_to(upper))
            info = full.lstat()
            if stat.S_ISCHR(info.st_mode) and info.st_rdev == 0:
                delete.append("/" + rel)
                continue
            if stat.S_ISDIR(info.st_mode) and not stat.S_ISLNK(info.st_mode):
                try:
                    if os.getxattr(full, OPAQUE_XATTR, follow_symlinks=False) == b"y":
                        delete.append("/" + rel)
                except OSError:
                    pass
            keep.append(rel)
    return keep, delete


def build_tree(
    loaded: LoadedRecipe,
    base_tree: Path,
    workdir: Path,
    progress: Progress,
    modules: list[tuple[str, bytes]] | None = None,
    module_tree: Path | None = None,
) -> LayerTree:
    """Run the recipe over ``base_tree`` (never modified) and pack what changed;
    ``modules`` (name, .ko bytes) are installed for the guest's init to load, and
    ``module_tree`` (the kernel's /lib/modules/<release>) as a whole when given."""
    if not (base_tree / "usr").is_dir():
        raise ImageError(
            f"the base image's file tree is not in the build cache ({base_tree})",
            hint="rebuild the base image: agent-vm image build --force",
        )
    if not remove_tree(workdir):  # a build that died half way left its overlay mounted
        raise ImageError(f"cannot clear the build directory {workdir}: still mounted")
    upper, work, root, staged = (workdir / d for d in ("upper", "work", "root", "files"))
    for directory in (upper, work, root, staged):
        directory.mkdir(parents=True)
    for index, copy in enumerate(loaded.recipe.files):
        shutil.copyfile(loaded.source(copy), staged / str(index))
    (staged / "defaults").write_text(defaults_json(loaded))
    if modules:
        (staged / "modules").mkdir()
        for name, data in modules:
            (staged / "modules" / f"{name}.ko").write_bytes(data)
    _mount_overlay(base_tree, upper, work, root)
    try:
        argv = _bwrap(root, staged)
        if module_tree is not None:
            argv += ["--ro-bind", str(module_tree), KERNEL_MODULES]
        release = module_tree.name if module_tree is not None else None
        for step in steps(loaded, [name for name, _ in modules or []], release):
            _run_step(argv, step, progress)
    finally:
        unmount_under(root)
    progress("packing the layer")
    keep, delete = _scan(upper)
    listing = workdir / "entries"
    listing.write_bytes(b"".join(p.encode("utf-8", "surrogateescape") + b"\0" for p in keep))
    deletions = workdir / "deletions"
    deletions.write_bytes(b"".join(p.encode("utf-8", "surrogateescape") + b"\0" for p in delete))
    tar = workdir / "layer.tar"
    proc = subprocess.run(
        [
            "tar", "--create", "--file", str(tar), "--directory", str(upper),
            "--numeric-owner", "--xattrs", "--xattrs-include=security.capability",
            "--no-recursion", "--null", "--files-from", str(listing),
        ],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise ImageError(f"packing the layer failed: {proc.stderr.strip()[-500:]}")
    shutil.rmtree(upper)
    shutil.rmtree(work, ignore_errors=True)
    for path in (tar, deletions):
        path.chmod(0o644)
    workdir.chmod(0o755)
    size = tar.stat().st_size
    log.info("layer_packed", recipe=loaded.recipe.name, bytes=size, entries=len(keep))
    return LayerTree(tar, deletions, size, len(keep), len(delete))

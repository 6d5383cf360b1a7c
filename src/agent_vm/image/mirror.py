"""Find the distribution suite, package mirror and apt sources the host already uses.

Building from the host's own mirror keeps image builds working on machines that can only
reach their configured mirror (the usual case on CI and in companies). Images list the
same suites as the host (``bookworm``, ``bookworm-updates``, ``bookworm-security``):
debootstrap alone knows only the release suite, so an image built from it alone misses
every security fix published since the last point release.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from agent_vm.errors import ImageError

DEFAULT_MIRRORS = {
    "debian": "http://deb.debian.org/debian",
    "ubuntu": "http://archive.ubuntu.com/ubuntu",
}


@dataclass(frozen=True)
class AptSource:
    """One ``deb`` line of an image's sources.list."""

    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]

    def line(self) -> str:
        return f"deb {self.uri} {' '.join(self.suites)} {' '.join(self.components)}"


@dataclass(frozen=True)
class Distro:
    id: str
    codename: str
    mirror: str
    sources: tuple[AptSource, ...] = ()


def read_os_release(path: Path = Path("/etc/os-release")) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            values[key] = value.strip().strip('"')
    return values


def _one_line_sources(text: str) -> list[tuple[str, list[str], list[str]]]:
    out = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line.startswith("deb "):
            continue
        line = re.sub(r"\[[^\]]*\]", "", line)  # drop [arch=... signed-by=...]
        parts = line.split()
        if len(parts) >= 3:
            out.append((parts[1], [parts[2]], parts[3:]))
    return out


def _deb822_sources(text: str) -> list[tuple[str, list[str], list[str]]]:
    out = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[0].isspace():
                continue
            key, value = line.split(":", 1)
            fields[key.strip().lower()] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() == "no":
            continue
        suites = fields.get("suites", "").split()
        components = fields.get("components", "").split()
        for uri in fields.get("uris", "").split():
            out.append((uri, suites, components))
    return out


def apt_sources(root: Path = Path("/etc/apt")) -> list[tuple[str, list[str], list[str]]]:
    """(uri, suites, components) for every enabled ``deb`` source on the host."""
    entries = []
    files = [root / "sources.list"]
    listdir = root / "sources.list.d"
    if listdir.is_dir():
        files += sorted(listdir.glob("*.list")) + sorted(listdir.glob("*.sources"))
    for file in files:
        if not file.is_file():
            continue
        text = file.read_text()
        entries += _deb822_sources(text) if file.suffix == ".sources" else _one_line_sources(text)
    return entries


def detect_distro(
    os_release: Path = Path("/etc/os-release"), apt_root: Path = Path("/etc/apt")
) -> Distro:
    release = read_os_release(os_release)
    distro_id = release.get("ID", "")
    codename = release.get("VERSION_CODENAME", "")
    if distro_id not in DEFAULT_MIRRORS or not codename:
        raise ImageError(
            f"unsupported host distribution {distro_id!r} {codename!r}",
            hint="agent-vm builds images on Debian and Ubuntu hosts; set AGENT_VM_SUITE and "
            "AGENT_VM_MIRROR to build anyway",
        )
    entries = apt_sources(apt_root)
    sources = tuple(
        AptSource(uri.rstrip("/"), tuple(mine), tuple(components))
        for uri, suites, components in entries
        if (mine := [s for s in suites if s == codename or s.startswith(codename + "-")])
        and components
    )
    for uri, suites, components in entries:
        if codename in suites and "main" in components:
            return Distro(distro_id, codename, uri.rstrip("/"), sources)
    return Distro(distro_id, codename, DEFAULT_MIRRORS[distro_id], sources)


def image_sources(distro: Distro, suite: str, mirror: str) -> list[AptSource]:
    """The host's sources for its own release, moved to ``suite`` and ``mirror``.

    ``bookworm-security`` becomes ``trixie-security`` when a trixie image is built on a
    bookworm host; the release suite's entry uses ``mirror`` (the build's, which may be
    overridden). Without any host entry for the release: the release suite alone.
    """
    out = []
    for source in distro.sources:
        suites = tuple(suite + s[len(distro.codename) :] for s in source.suites)
        uri = mirror if suite in suites else source.uri
        out.append(AptSource(uri, suites, source.components))
    if not any(suite in source.suites for source in out):
        out.insert(0, AptSource(mirror, (suite,), ("main",)))
    return out

"""SafeExtractor against tar streams a hostile guest could send (crafted here, in memory).

Each trap is its own test: the destination sits in a "jail" next to a sentinel file and a
directory outside it; after extraction nothing outside the destination may have changed.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from agent_vm.communication.extract import SafeExtractor, safe_name
from agent_vm.errors import ExtractionError

Member = Callable[[tarfile.TarFile], None]


def file(name: str, data: bytes = b"x", mode: int = 0o644) -> Member:
    def add(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode = len(data), mode
        tar.addfile(info, io.BytesIO(data))

    return add


def special(name: str, kind: bytes, linkname: str = "") -> Member:
    def add(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, linkname
        if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
            info.devmajor, info.devminor = 1, 3
        tar.addfile(info)

    return add


def tar_of(*members: Member) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for add in members:
            add(tar)
    buf.seek(0)
    return buf


class Jail:
    """dest/ to extract into; outside/ and sentinel next to it must never change."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.dest = root / "dest"
        self.outside = root / "outside"
        self.outside.mkdir()
        self.sentinel = root / "sentinel"
        self.sentinel.write_text("untouched")

    def snapshot(self) -> dict[str, tuple[int, int, bytes | str]]:
        state = {}
        for path in sorted(self.root.rglob("*")):
            if path == self.dest or self.dest in path.parents:
                continue
            info = path.lstat()
            if stat.S_ISREG(info.st_mode):
                content: bytes | str = path.read_bytes()
            elif stat.S_ISLNK(info.st_mode):
                content = str(path.readlink())
            else:
                content = ""
            state[str(path)] = (info.st_mode, info.st_size, content)
        return state

    def extract(self, stream: io.BytesIO, max_bytes: int = 1 << 30) -> SafeExtractor:
        before = self.snapshot()
        with SafeExtractor(str(self.dest), max_bytes, 10_000) as extractor:
            try:
                extractor.extract(stream)
            finally:
                assert self.snapshot() == before, "something outside the destination changed"
        return extractor

    def tree(self) -> dict[str, str]:
        out = {}
        for path in sorted(self.dest.rglob("*")):
            info = path.lstat()
            rel = str(path.relative_to(self.dest))
            if stat.S_ISLNK(info.st_mode):
                out[rel] = f"-> {path.readlink()}"
            elif stat.S_ISDIR(info.st_mode):
                out[rel] = "dir"
            else:
                assert stat.S_ISREG(info.st_mode), f"{rel} is neither file, dir nor link"
                out[rel] = path.read_text()
        return out


@pytest.fixture
def jail(tmp_path: Path) -> Jail:
    return Jail(tmp_path)


def test_dotdot_and_absolute_names_are_skipped(jail: Jail) -> None:
    result = jail.extract(
        tar_of(file("../sentinel", b"owned"), file("a/../../outside/x"), file("/abs"), file("ok"))
    )
    assert jail.tree() == {"ok": "x"}
    assert {name for name, _ in result.skipped} == {"../sentinel", "a/../../outside/x", "/abs"}
    assert not Path("/abs").exists()


@pytest.mark.parametrize("target", ["/etc", "../outside", "a/../../outside", "../../"])
def test_a_symlink_out_is_not_made_and_nothing_goes_through_it(jail: Jail, target: str) -> None:
    result = jail.extract(
        tar_of(special("link", tarfile.SYMTYPE, target), file("link/passwd", b"owned"))
    )
    # the link is not made; the file below its name lands inside the destination
    assert jail.tree() == {"link": "dir", "link/passwd": "owned"}
    assert [name for name, _ in result.skipped] == ["link"]


def test_an_inside_symlink_is_kept_but_never_followed(jail: Jail) -> None:
    jail.extract(
        tar_of(
            file("real/f", b"data"),
            special("alias", tarfile.SYMTYPE, "real"),
            file("alias/g", b"through"),  # would land in real/ if followed
        )
    )
    assert jail.tree() == {"alias": "-> real", "real": "dir", "real/f": "data"}


def test_an_existing_symlink_in_the_destination_is_replaced_not_followed(jail: Jail) -> None:
    jail.dest.mkdir()
    (jail.dest / "f").symlink_to(jail.sentinel)
    jail.extract(tar_of(file("f", b"new")))
    assert jail.tree() == {"f": "new"}
    assert jail.sentinel.read_text() == "untouched"


def test_hardlinks_only_to_files_of_this_stream(jail: Jail) -> None:
    result = jail.extract(
        tar_of(
            special("to-etc", tarfile.LNKTYPE, "/etc/passwd"),
            special("to-outside", tarfile.LNKTYPE, "../sentinel"),
            special("to-nothing", tarfile.LNKTYPE, "missing"),
            file("mine", b"m"),
            special("to-mine", tarfile.LNKTYPE, "mine"),
        )
    )
    assert jail.tree() == {"mine": "m", "to-mine": "m"}
    assert {n for n, _ in result.skipped} == {"to-etc", "to-outside", "to-nothing"}


def test_fifos_and_device_nodes_are_never_made(jail: Jail) -> None:
    result = jail.extract(
        tar_of(
            special("fifo", tarfile.FIFOTYPE),
            special("null", tarfile.CHRTYPE),
            special("disk", tarfile.BLKTYPE),
            file("ok"),
        )
    )
    assert jail.tree() == {"ok": "x"}
    assert {n for n, _ in result.skipped} == {"fifo", "null", "disk"}


def test_a_fifo_already_at_a_name_is_replaced_without_blocking(jail: Jail) -> None:
    jail.dest.mkdir()
    os.mkfifo(jail.dest / "f")
    done = threading.Event()

    def run() -> None:
        jail.extract(tar_of(file("f", b"data")))
        done.set()

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(10)
    assert done.is_set(), "extraction blocked on a FIFO"
    assert jail.tree() == {"f": "data"}


def test_setuid_setgid_sticky_and_write_bits_are_dropped(jail: Jail) -> None:
    jail.extract(tar_of(file("suid", mode=0o6777), file("plain", mode=0o600)))
    assert stat.S_IMODE((jail.dest / "suid").stat().st_mode) == 0o755
    assert stat.S_IMODE((jail.dest / "plain").stat().st_mode) == 0o600


def test_the_byte_cap_stops_with_a_clear_error(jail: Jail) -> None:
    with pytest.raises(ExtractionError, match="1000"):
        jail.extract(tar_of(file("a", b"x" * 800), file("b", b"y" * 800)), max_bytes=1000)
    assert (jail.dest / "a").read_bytes() == b"x" * 800


def test_safe_name() -> None:
    assert safe_name("a/./b//c") == ("a", "b", "c")
    for bad in ("", "/x", "..", "a/../b", "x\0y", ".", "./"):
        assert safe_name(bad) is None, bad

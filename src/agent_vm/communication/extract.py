"""Writing a tree that came from the guest onto the host, without trusting it.

A tar stream from the guest is hostile input. ``SafeExtractor`` writes it below one
destination directory and nowhere else:

* names are checked before anything is made: no absolute paths, no ``..``, no NUL,
  nothing that normalises to the destination itself;
* every directory on the way is opened relative to the one before with ``O_NOFOLLOW``
  (``openat``), so a symlink, whether it was in the destination before or came in this
  stream, is never followed; an entry below a symlink is refused;
* files are created fresh (``O_CREAT|O_EXCL|O_NOFOLLOW`` after removing what was there),
  so an existing FIFO, device node or symlink at that name is replaced, never opened;
* symlinks are made only when their target is relative and never goes up (``..``);
  hardlinks only to a file this stream already wrote; FIFOs and device nodes never;
* modes lose setuid, setgid, sticky and group/other write; owners become the
  destination directory's owner;
* a byte cap and an entry cap stop the extraction with an ExtractionError naming them.

Skipped entries are listed in ``skipped`` (name, reason) for the caller to report.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from agent_vm.errors import ExtractionError

MODE_MASK = 0o755
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
CHUNK = 1 << 20


def safe_name(name: str) -> tuple[str, ...] | None:
    """The components of a member name, or None when it must not be written."""
    if not name or "\0" in name or name.startswith("/"):
        return None
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if not parts or any(p == ".." for p in parts):
        return None
    return parts


@dataclass
class SafeExtractor:
    destination: str
    max_bytes: int
    max_entries: int
    written_bytes: int = 0
    entries: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    _files: set[tuple[str, ...]] = field(default_factory=set)

    def __post_init__(self) -> None:
        Path(self.destination).mkdir(parents=True, exist_ok=True)
        self._root = os.open(self.destination, DIR_FLAGS)
        st = os.fstat(self._root)
        self._owner = (st.st_uid, st.st_gid)

    def close(self) -> None:
        os.close(self._root)

    def __enter__(self) -> SafeExtractor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ walking

    @contextlib.contextmanager
    def _parent(self, parts: tuple[str, ...]) -> Iterator[int]:
        """The directory that holds ``parts[-1]``, made as needed, never via a symlink."""
        fd = os.dup(self._root)
        try:
            for part in parts[:-1]:
                try:
                    child = os.open(part, DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    os.mkdir(part, 0o755, dir_fd=fd)
                    self._own(part, fd)
                    child = os.open(part, DIR_FLAGS, dir_fd=fd)
                except (NotADirectoryError, OSError) as exc:  # a symlink (ELOOP) or a file
                    raise _Skip(f"a parent is not a directory ({exc.strerror})") from None
                os.close(fd)
                fd = child
            yield fd
        finally:
            os.close(fd)

    def _own(self, name: str, dir_fd: int) -> None:
        with contextlib.suppress(OSError):
            os.chown(name, *self._owner, dir_fd=dir_fd, follow_symlinks=False)

    def _clear(self, name: str, dir_fd: int, keep_dir: bool) -> None:
        """Remove what is at ``name`` unless it is a directory we may keep."""
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            if keep_dir:
                return
            raise _Skip("a directory is in the way")
        os.unlink(name, dir_fd=dir_fd)

    # ------------------------------------------------------------------ members

    def extract(self, fileobj: IO[bytes]) -> None:
        """Write every member of the tar stream ``fileobj``; raise ExtractionError at a cap."""
        with tarfile.open(fileobj=fileobj, mode="r|") as tar:
            for member in tar:
                self._member(tar, member)

    def _member(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        parts = safe_name(member.name)
        if parts is None:
            self.skipped.append((member.name[:256], "unsafe name"))
            return
        self.entries += 1
        if self.entries > self.max_entries:
            raise ExtractionError(
                f"more than {self.max_entries} entries: extraction stopped",
                hint="raise max_entries, or download less",
            )
        try:
            with self._parent(parts) as parent:
                name = parts[-1]
                if member.isdir():
                    self._clear(name, parent, keep_dir=True)
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(name, 0o700, dir_fd=parent)
                    self._own(name, parent)
                    os.chmod(name, (member.mode & MODE_MASK) | 0o700, dir_fd=parent,
                             follow_symlinks=False)  # fmt: skip
                elif member.isreg():
                    self._file(tar, member, parts, parent)
                elif member.issym():
                    # relative and never upwards: then every chain of such links stays
                    # below the directory it starts in (lexical checks with ".." are not
                    # sound once other symlinks are involved)
                    target = member.linkname
                    if target.startswith("/") or ".." in target.split("/") or "\0" in target:
                        raise _Skip("symlink that may point outside the destination")
                    self._clear(name, parent, keep_dir=False)
                    os.symlink(target, name, dir_fd=parent)
                    self._own(name, parent)
                elif member.islnk():
                    source = safe_name(member.linkname)
                    if source is None or source not in self._files:
                        raise _Skip("hardlink to something this download did not write")
                    self._clear(name, parent, keep_dir=False)
                    with self._parent(source) as source_parent:
                        os.link(source[-1], name, src_dir_fd=source_parent, dst_dir_fd=parent,
                                follow_symlinks=False)  # fmt: skip
                else:
                    raise _Skip("device nodes, FIFOs and sockets are never written")
        except _Skip as skip:
            self.skipped.append(("/".join(parts)[:256], str(skip)))

    def _file(
        self, tar: tarfile.TarFile, member: tarfile.TarInfo, parts: tuple[str, ...], parent: int
    ) -> None:
        if self.written_bytes + member.size > self.max_bytes:
            raise ExtractionError(
                f"more than {self.max_bytes} bytes: extraction stopped at {'/'.join(parts)[:200]}",
                hint="raise max_bytes, or download less",
            )
        name = parts[-1]
        self._clear(name, parent, keep_dir=False)
        fd = os.open(
            name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
            dir_fd=parent,
        )  # fmt: skip
        try:
            source = tar.extractfile(member)
            assert source is not None
            left = member.size
            while left > 0:
                data = source.read(min(CHUNK, left))
                if not data:
                    break
                left -= len(data)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            self.written_bytes += member.size - left
            os.fchmod(fd, member.mode & MODE_MASK | 0o600)
            with contextlib.suppress(OSError):
                os.fchown(fd, *self._owner)
            with contextlib.suppress(OSError, OverflowError, ValueError):
                os.utime(fd, (member.mtime, member.mtime))
        finally:
            os.close(fd)
        self._files.add(parts)


class _Skip(Exception):
    """This entry is not written (the reason is recorded); extraction goes on."""

"""Processes that hold the workspace's 9p share, and moving their working directory.

QEMU refuses to migrate (pause, snapshot, fork) while the guest has the 9p share mounted,
and a process whose working directory is in it keeps the mount alive after any unmount.
So before the share goes, every such process is made to call ``chdir("/")`` (injected
through ptrace: the process is stopped for a moment, one system call runs in it, its
registers and memory are put back exactly) and after the share is back, ``chdir`` to
where it was. A process with a file of the share open or mapped cannot be moved: the
detach is refused naming it.

The injection runs in a helper process (``python3 -m agent_vm.guest.unpin``): a traced
process's stops are reported to its tracer, and the agent's own children must never
look stopped to the agent's ``waitpid``. x86_64 only; standard library only.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import sys

PTRACE_PEEKDATA, PTRACE_POKEDATA, PTRACE_SINGLESTEP = 2, 5, 9
PTRACE_GETREGS, PTRACE_SETREGS, PTRACE_DETACH = 12, 13, 17
PTRACE_SEIZE, PTRACE_INTERRUPT = 0x4206, 0x4207
WALL = 0x40000000
SYS_CHDIR = 80
SYSCALL = 0x050F  # the two bytes of ``syscall``, little-endian


_REGISTERS = (
    "r15 r14 r13 r12 rbp rbx r11 r10 r9 r8 rax rcx rdx rsi rdi orig_rax rip cs eflags rsp ss"
    " fs_base gs_base ds es fs gs"
)


class Regs(ctypes.Structure):
    """x86_64 ``struct user_regs_struct``."""

    _fields_ = [(name, ctypes.c_ulonglong) for name in _REGISTERS.split()]


def holders(device: int) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(processes whose working directory is on ``device``, with it; processes holding a
    file of it otherwise: open, mapped, or as their root), the agent itself left out."""
    cwd_holders: list[tuple[int, str]] = []
    others: list[tuple[int, str]] = []
    me = os.getpid()
    major, minor = os.major(device), os.minor(device)
    mapped = f"{major:02x}:{minor:02x}"
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in (me, 1):
            continue
        pid = int(entry)
        try:
            if os.stat(f"/proc/{pid}/root").st_dev == device:
                others.append((pid, "its root directory"))
                continue
            for fd in os.listdir(f"/proc/{pid}/fd"):
                path = f"/proc/{pid}/fd/{fd}"
                if os.stat(path).st_dev == device:
                    others.append((pid, f"the open file {os.readlink(path)}"))
                    break
            with open(f"/proc/{pid}/maps") as maps:
                hit = next(
                    (line for line in maps if line.split(" ", 4)[3:4] == [mapped[:-1]]), None
                )
            if hit is not None:
                others.append((pid, f"the mapped file {hit.split()[-1]}"))
            elif os.stat(f"/proc/{pid}/cwd").st_dev == device:
                cwd_holders.append((pid, os.readlink(f"/proc/{pid}/cwd")))
        except OSError:
            continue  # gone meanwhile, or a kernel thread
    return cwd_holders, others


def describe(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as comm:
            return f"process {pid} ({comm.read().strip()})"
    except OSError:
        return f"process {pid}"


def start_time(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _ptrace(libc: ctypes.CDLL, request: int, pid: int, addr: int, data: object) -> int:
    ctypes.set_errno(0)
    result = int(libc.ptrace(ctypes.c_long(request), ctypes.c_long(pid),
                             ctypes.c_void_p(addr), data))  # fmt: skip
    errno = ctypes.get_errno()
    if result == -1 and errno:
        raise OSError(errno, f"ptrace {request:#x} on {pid}: {os.strerror(errno)}")
    return result


def chdir_in(pid: int, path: str) -> None:
    """Make ``pid`` call ``chdir(path)``; raises OSError if that fails."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.restype = ctypes.c_long
    _ptrace(libc, PTRACE_SEIZE, pid, 0, ctypes.c_void_p(0))
    try:
        _ptrace(libc, PTRACE_INTERRUPT, pid, 0, ctypes.c_void_p(0))
        os.waitpid(pid, WALL)
        saved = Regs()
        _ptrace(libc, PTRACE_GETREGS, pid, 0, ctypes.byref(saved))
        text = path.encode() + b"\0"
        text += b"\0" * (-len(text) % 8)
        where = (saved.rsp - 4096 - len(text)) & ~0xF  # below the red zone: unused
        words = [text[i : i + 8] for i in range(0, len(text), 8)]
        old_stack = [_peek(libc, pid, where + 8 * i) for i in range(len(words))]
        old_code = _peek(libc, pid, saved.rip)
        try:
            for i, word in enumerate(words):
                _poke(libc, pid, where + 8 * i, int.from_bytes(word, "little"))
            _poke(libc, pid, saved.rip, (old_code & ~0xFFFF) | SYSCALL)
            regs = Regs.from_buffer_copy(saved)
            regs.rax, regs.rdi, regs.orig_rax = SYS_CHDIR, where, 2**64 - 1
            _ptrace(libc, PTRACE_SETREGS, pid, 0, ctypes.byref(regs))
            _ptrace(libc, PTRACE_SINGLESTEP, pid, 0, ctypes.c_void_p(0))
            os.waitpid(pid, WALL)
            _ptrace(libc, PTRACE_GETREGS, pid, 0, ctypes.byref(regs))
            result = ctypes.c_longlong(regs.rax).value
        finally:
            _poke(libc, pid, saved.rip, old_code)
            for i, kept in enumerate(old_stack):
                _poke(libc, pid, where + 8 * i, kept)
            _ptrace(libc, PTRACE_SETREGS, pid, 0, ctypes.byref(saved))
    finally:
        _ptrace(libc, PTRACE_DETACH, pid, 0, ctypes.c_void_p(0))
    if result < 0:
        raise OSError(-result, f"chdir({path}) in process {pid}: {os.strerror(-result)}")


def _peek(libc: ctypes.CDLL, pid: int, addr: int) -> int:
    return _ptrace(libc, PTRACE_PEEKDATA, pid, addr, ctypes.c_void_p(0)) & (2**64 - 1)


def _poke(libc: ctypes.CDLL, pid: int, addr: int, word: int) -> None:
    _ptrace(libc, PTRACE_POKEDATA, pid, addr, ctypes.c_void_p(word))


def main() -> None:
    """``python3 -m agent_vm.guest.unpin '[[pid, path], ...]'``: prints the failures."""
    failures = {}
    for pid, path in json.loads(sys.argv[1]):
        try:
            chdir_in(int(pid), str(path))
        except OSError as exc:
            if exc.errno != errno.ESRCH:  # else it ended meanwhile: nothing holds
                failures[str(pid)] = str(exc)
    print(json.dumps(failures))


if __name__ == "__main__":
    main()

"""A task's program: the file that its command runs, and why that file cannot run.

A failure to start a task is the job's own when every node would fail the same way. The
program, its ``#!`` interpreter or its dynamic loader is missing, not executable or in a
format the machine cannot run, or the arguments are too large. Such a task fails at once with
:class:`CommandNotRunnableError`, which carries the exit status a POSIX shell gives and a
message naming the program and the reason, and the scheduler ends the job. Any other failure
is the node's own: the agent rejects the start, and the scheduler places the job again, on
another node if one is free, until the job's start-failure limit.

Both ways of starting a task (the launcher's ``posix_spawn`` and ``subprocess.Popen`` in the
agent) execute the file directly, without a shell, so they fail with the same error number.
A file without a ``#!`` line is therefore not run as a shell script: it fails with ENOEXEC.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import struct
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Final

if TYPE_CHECKING:
    from agents.task_user import TaskUser

JOB_ERRNOS: Final = frozenset(
    {
        errno.ENOENT,
        errno.ENOTDIR,
        errno.ELOOP,
        errno.ENAMETOOLONG,
        errno.EACCES,
        errno.ENOEXEC,
        errno.EISDIR,
        errno.ELIBBAD,
        errno.EINVAL,
        errno.E2BIG,
    }
)
"""Errors of executing a task's program (``execve``) that are the job's own.

- ENOENT: the program, its ``#!`` interpreter or the dynamic loader that it names does not
  exist.
- ENOTDIR, ELOOP, ENAMETOOLONG: one of those paths has a file where a folder should be, a
  loop of symbolic links, or a name that is too long.
- EACCES: no execute permission on the program or its interpreter, no search permission on a
  folder of their paths, a file system mounted ``noexec``, or a program that is not a regular
  file (a directory, say).
- ENOEXEC: the file is neither a ``#!`` script nor a binary for this machine.
- EISDIR, ELIBBAD: the dynamic loader is a directory, or not in a format the machine can run.
- EINVAL: an ELF file with more than one dynamic loader. The agent also raises it before the
  spawn, for a NUL character in the command or its environment or an invalid variable name.
- E2BIG: the arguments and the environment are larger than the kernel allows.

Every other error is the node's own, and the start is rejected:

- EAGAIN, ENOMEM: no process slot or no memory for the new process.
- EMFILE, ENFILE: no file descriptors left.
- ETXTBSY: the program file is open for writing on this node, which is usually soon over.
- EIO: the node's storage failed.
- EPERM: the node's tracing or security settings.
- ECHILD: the task launcher went away (see ``agents.task_process.TaskLauncher``).
- any other number, or none: a retry costs at most the start-failure limit, while a job that
  failed for a node's fault cannot be undone.

Failures before the program is executed (the task folder, the log file, the launcher) are the
node's own, whatever their number.
"""

_HEAD_SIZE = 256
"""Bytes read from the start of a program: Linux 5.1 and later read the ``#!`` line from as many."""
_ELF_MAGIC = b"\x7fELF"
_PT_INTERP = 3
"""ELF program header type of the dynamic loader's path."""
_MAX_PROGRAM_HEADERS = 64


class CommandNotRunnableError(Exception):
    """The task's program cannot run, and would not run on any other node either.

    ``exit_code`` is the status a POSIX shell returns for such a command: 127 when a file is
    not found (ENOENT), as bash 5.2 returns it for a missing interpreter too, and 126 for any
    other reason. ``errno`` is the error number, or the one ``execve`` would return.
    """

    def __init__(self, program: str, reason: str, error_number: int) -> None:
        super().__init__(f"cannot run {_shown(program)}: {reason}")
        self.errno = error_number
        self.exit_code = 127 if error_number == errno.ENOENT else 126


FOUND_ON_PATH_TTL_S: Final = 1.0
"""Seconds a program found on a PATH is reused without searching again.

A node starts hundreds of tasks a second that name the same program, and searching the PATH
costs a few file checks each. A reused program is checked to be still an executable file, so a
program removed or made unexecutable within this time is searched for again. A program added to
an earlier PATH entry within this time is not seen until it passes."""
_MAX_LINKS: Final = 40
"""Symbolic links that resolving one path follows at most, as Linux follows (then ELOOP)."""
_FOUND_ON_PATH_MAX: Final = 256
_found_on_path: dict[tuple[str, str, str, int | None], tuple[float, str]] = {}
"""(program name, PATH, working directory, task uid) to (monotonic time found, file)."""


def resolve_command(
    command: Sequence[str], env: Mapping[str, str], cwd: Path, user: TaskUser | None = None
) -> str:
    """Return the file that ``command`` runs, or raise :class:`CommandNotRunnableError`.

    ``user`` is the task user the command runs as, or None for the agent's own user. Raises
    ``OSError`` when the node cannot look for the file (an I/O error, say).
    """
    texts = [*command, *env, *env.values()]
    if any("\0" in text for text in texts):
        reason = "the command or its environment contains a NUL character"
        raise CommandNotRunnableError(command[0], reason, errno.EINVAL)
    # posix_spawn and Popen raise ValueError for such a name, as they do for a NUL.
    bad_names = sorted(repr(name) for name in env if not name or "=" in name)
    if bad_names:
        reason = f"invalid environment variable name (empty or with '='): {', '.join(bad_names)}"
        raise CommandNotRunnableError(command[0], reason, errno.EINVAL)
    return find_executable(command[0], env.get("PATH", os.defpath), cwd, user)


def find_executable(name: str, search_path: str, cwd: Path, user: TaskUser | None = None) -> str:
    """Return the file that executing ``name`` runs: a path as given, else found on ``search_path``.

    The task is given this file rather than the bare name, so that it runs the program and not
    a builtin of the same name (``echo``, ``kill``). Raises :class:`CommandNotRunnableError`
    when there is no such executable file, and ``OSError`` when the node cannot look for it.
    """
    if "/" in name:
        # Absolute, because the task runs in ``cwd`` and ``cwd`` may be relative to ours. Not
        # normalized, so that ``..`` after a symbolic link resolves as the kernel resolves it.
        candidate = os.path.join(os.getcwd(), cwd, name)
        try:
            mode = os.stat(candidate).st_mode
        except OSError as error:
            if error.errno not in JOB_ERRNOS:
                raise
            raise CommandNotRunnableError(name, os.strerror(error.errno), error.errno) from error
        if stat.S_ISDIR(mode):
            raise CommandNotRunnableError(name, "it is a directory, not a program", errno.EACCES)
        if not may_execute(candidate, user):
            reason = f"permission denied: {_not_executable_reason(candidate, mode, user)}"
            raise CommandNotRunnableError(name, reason, errno.EACCES)
        return candidate
    # A relative entry of the PATH (an empty one is the working directory) is taken from
    # the task's working directory, as execvp would take it from inside the task.
    base = os.path.join(os.getcwd(), cwd)
    key = (name, search_path, base, user.uid if user is not None else None)
    now = time.monotonic()
    cached = _found_on_path.get(key)
    if cached is not None and now - cached[0] < FOUND_ON_PATH_TTL_S:
        # One check in place of the search, because a spawn of a file removed since would fail
        # the task for good while a later PATH entry may hold the program.
        if _executable_file(cached[1], user):
            return cached[1]
    entries = [os.path.join(base, entry) for entry in search_path.split(os.pathsep)]
    # Directories and files without execute permission are skipped, as execvp skips them.
    if user is None:
        found = shutil.which(name, path=os.pathsep.join(entries))
    else:
        paths = (os.path.join(entry, name) for entry in entries)
        found = next((path for path in paths if _executable_file(path, user)), None)
    if found is None:
        # As execvp and bash do, a file that only lacks execute permission is denied, not missing.
        denied = _first_file(name, entries)
        if denied is not None:
            path, mode = denied
            reason = (
                f"permission denied: {_shown(path)}: {_not_executable_reason(path, mode, user)}"
            )
            raise CommandNotRunnableError(name, reason, errno.EACCES)
        reason = f"no executable file of that name on the task's PATH ({search_path})"
        raise CommandNotRunnableError(name, reason, errno.ENOENT)
    if len(_found_on_path) >= _FOUND_ON_PATH_MAX:
        _found_on_path.clear()
    _found_on_path[key] = (now, found)
    return found


def _executable_file(path: str, user: TaskUser | None) -> bool:
    """Return whether ``path`` passes the checks that :func:`shutil.which` makes, for ``user``."""
    return may_execute(path, user) and not os.path.isdir(path)


def may_execute(path: str, user: TaskUser | None) -> bool:
    """Return whether ``user``, or the agent's own user when None, may execute ``path``.

    For a task user the mode bits decide, as the kernel decides for its uid and groups. They
    are those of the file, and the search bit of each folder that the kernel looks a name up
    in on the way, including folders that contain symbolic links and their targets. Access
    control lists are not read, and a file on a file system mounted noexec is never executable.
    """
    if user is None:
        return os.access(path, os.X_OK)
    try:
        resolved = _resolve_as(os.path.join(os.getcwd(), path), user)
        if resolved is None:
            return False
        if os.statvfs(resolved).f_flag & os.ST_NOEXEC:
            return False
        return _mode_lets(os.stat(resolved), user)
    except OSError:
        return False


def _resolve_as(path: str, user: TaskUser) -> str | None:
    """Return absolute ``path`` with its links resolved, or None if ``user`` cannot reach it.

    Walks the path one name at a time, as the kernel does, and requires the search bit that
    applies to ``user`` on each folder a name is looked up in. Raises ``OSError`` when a name
    is missing, and returns None after more than :data:`_MAX_LINKS` symbolic links (ELOOP).
    """
    names = [name for name in reversed(path.split("/")) if name not in ("", ".")]
    current = "/"
    links = 0
    while names:
        name = names.pop()
        if not _mode_lets(os.stat(current), user):
            return None
        if name == "..":
            current = os.path.dirname(current)
            continue
        candidate = os.path.join(current, name)
        if not stat.S_ISLNK(os.lstat(candidate).st_mode):
            current = candidate
            continue
        links += 1
        if links > _MAX_LINKS:
            return None
        target = os.readlink(candidate)
        if target.startswith("/"):
            current = "/"
        names.extend(name for name in reversed(target.split("/")) if name not in ("", "."))
    return current


def _mode_lets(status: os.stat_result, user: TaskUser) -> bool:
    """Return whether the execute (or search) bit that applies to ``user`` is set."""
    if status.st_uid == user.uid:
        return bool(status.st_mode & stat.S_IXUSR)
    if status.st_gid == user.gid or status.st_gid in user.groups:
        return bool(status.st_mode & stat.S_IXGRP)
    return bool(status.st_mode & stat.S_IXOTH)


def _not_executable_reason(path: str, mode: int, user: TaskUser | None = None) -> str:
    """Return why the file at ``path``, of ``mode``, that :func:`may_execute` denied cannot run."""
    try:
        noexec = bool(os.statvfs(path).f_flag & os.ST_NOEXEC)
    except OSError:
        noexec = False
    if noexec:
        return (
            "its file system is mounted noexec "
            "(move the program to one that allows programs to run)"
        )
    if not mode & (stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH):
        return "the file is not executable (chmod +x makes it so)"
    if user is not None:
        return (
            f"its owner and mode, or those of a folder above it, do not let the task user "
            f"{user.name} execute it"
        )
    return "its owner and mode do not let the agent's user execute it"


def _first_file(name: str, folders: Sequence[str]) -> tuple[str, int] | None:
    """Return the first regular file named ``name`` in ``folders`` with its mode, or None."""
    for folder in folders:
        candidate = os.path.join(folder, name)
        try:
            mode = os.stat(candidate).st_mode
        except OSError:
            continue
        if stat.S_ISREG(mode):
            return candidate, mode
    return None


def unrunnable_command(
    error: OSError,
    command: Sequence[str],
    executable: str,
    env: Mapping[str, str],
    cwd: Path,
    user: TaskUser | None = None,
) -> CommandNotRunnableError | None:
    """Explain an error of executing ``executable`` if it is the job's own, else return None.

    ``error`` must come from executing the program, not from the steps before, whose failures
    are the node's own. ``command`` and ``env`` are the task's arguments and environment, and
    ``cwd`` its working directory, from which a relative interpreter path is taken. ``user``
    is the task user it ran as, or None for the agent's own user.
    """
    number = error.errno or 0
    if number not in JOB_ERRNOS:
        return None
    program = command[0]
    if "/" not in program and executable != program:
        program = f"{program} ({executable})"
    reason = _exec_reason(number, executable, command, env, cwd, user)
    return CommandNotRunnableError(program, reason, number)


def _exec_reason(
    number: int,
    executable: str,
    command: Sequence[str],
    env: Mapping[str, str],
    cwd: Path,
    user: TaskUser | None,
) -> str:
    """Return why executing ``executable`` failed with ``number``, from what its file shows."""
    if number == errno.E2BIG:
        return _too_large_reason(command, env)
    head = _read_head(executable)
    if head.startswith(b"#!"):
        reason = _interpreter_reason(number, head, cwd, user)
        if reason is not None:
            return reason
    if head.startswith(_ELF_MAGIC):
        loader = _elf_interpreter(executable)
        if number == errno.ENOEXEC:
            return (
                "exec format error: an ELF binary that this machine cannot run "
                "(built for another architecture, say)"
            )
        if loader is not None and number in (errno.ENOENT, errno.EISDIR, errno.ELIBBAD):
            return (
                f"bad dynamic loader {_shown(loader)}: {os.strerror(number)} "
                "(the binary is built for another system, or for a C library this node lacks)"
            )
    if number == errno.ENOEXEC:
        return (
            "exec format error: the file is neither a script with a #! line "
            "nor a binary for this machine"
        )
    if number == errno.EACCES and os.path.isdir(executable):
        return "it is a directory, not a program"
    if number == errno.EACCES and user is not None:
        return (
            f"{os.strerror(number)} for the task user {user.name} (the file, its interpreter "
            "or a folder above them does not let that user execute it)"
        )
    return os.strerror(number)


def _interpreter_reason(number: int, head: bytes, cwd: Path, user: TaskUser | None) -> str | None:
    """Return why the ``#!`` interpreter in ``head`` failed, or None if it is not at fault."""
    line = head[2:].split(b"\n", 1)[0]
    # Linux ends the interpreter at the first space or tab, so a carriage return is part of it.
    name = re.split(rb"[ \t]", line.strip(b" \t"), maxsplit=1)[0]
    if not name:
        return "exec format error: the #! line names no interpreter"
    interpreter = os.fsdecode(name)
    path = os.path.join(os.getcwd(), cwd, interpreter)
    runnable = _executable_file(path, user)
    if number == errno.EACCES and runnable:
        # The interpreter may run, so the script itself is denied (a noexec file system, say).
        return None
    reason = f"bad interpreter {_shown(interpreter)}: {os.strerror(number)}"
    if interpreter.endswith("\r"):
        return f"{reason} (the #! line ends with a carriage return: convert the Windows line ends)"
    if number == errno.ENOENT and os.path.exists(path):
        return f"{reason} (it exists, but its own interpreter or dynamic loader does not)"
    return reason


def _too_large_reason(command: Sequence[str], env: Mapping[str, str]) -> str:
    strings = [*command, *(f"{name}={value}" for name, value in env.items())]
    # Each string is passed with its NUL terminator.
    sizes = [len(os.fsencode(text)) + 1 for text in strings]
    return (
        f"argument list too long: the arguments and environment take {sum(sizes)} bytes, the "
        f"longest string {max(sizes)} bytes, while Linux allows 32 pages (128 KiB) per string "
        "and a quarter of the stack size limit (ulimit -s), at most 6 MiB, in all"
    )


def _read_head(path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read(_HEAD_SIZE)
    except OSError:
        return b""


def _elf_interpreter(path: str) -> str | None:
    """Return the dynamic loader that the ELF file at ``path`` names, or None if it has none."""
    try:
        with open(path, "rb") as file:
            return _read_elf_interpreter(file)
    except (OSError, struct.error, ValueError):
        return None


def _read_elf_interpreter(file: BinaryIO) -> str | None:
    header = file.read(64)
    if len(header) < 52 or header[4] not in (1, 2) or header[5] not in (1, 2):
        return None
    wide = header[4] == 2
    order = "<" if header[5] == 1 else ">"
    if wide:
        (table_offset,) = struct.unpack_from(order + "Q", header, 32)
        entry_size, entry_count = struct.unpack_from(order + "HH", header, 54)
    else:
        (table_offset,) = struct.unpack_from(order + "I", header, 28)
        entry_size, entry_count = struct.unpack_from(order + "HH", header, 42)
    if entry_size != (56 if wide else 32):
        return None
    file.seek(table_offset)
    # Binaries have about a dozen program headers, so the cap only bounds the read of a bad file.
    table = file.read(entry_size * min(entry_count, _MAX_PROGRAM_HEADERS))
    for start in range(0, len(table) - entry_size + 1, entry_size):
        (kind,) = struct.unpack_from(order + "I", table, start)
        if kind != _PT_INTERP:
            continue
        if wide:
            offset, size = struct.unpack_from(order + "Q8x8xQ", table, start + 8)
        else:
            offset, size = struct.unpack_from(order + "I4x4xI", table, start + 4)
        file.seek(offset)
        return os.fsdecode(file.read(min(size, 4096)).rstrip(b"\0"))
    return None


def _shown(name: str) -> str:
    """Return ``name`` as it reads in a message: quoted when empty or not printable."""
    return name if name and name.isprintable() else repr(name)

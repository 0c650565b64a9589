"""The variables that let a job's tasks find each other, and the file of their hosts.

A start command carries the hosts of a gang's nodes once each and, per task, the position of
its node in that list (see ``AgentCommand.node_hosts``). From them the agent derives the task
count, the task's index among the job's tasks on its node, the rendezvous host (task 0's
node) and the file of every task's host. A one-task job's command carries no hosts, and its
task gets the agent's own host.

The host list is a file rather than a variable, because Linux limits one environment string
to 128 KiB (``MAX_ARG_STRLEN``), which 4,096 hosts of 32 characters already exceed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from agents.task_process import task_file_stem

logger = logging.getLogger(__name__)

TASK_COUNT_ENV: Final = "ACSP_TASK_COUNT"
LOCAL_TASK_INDEX_ENV: Final = "ACSP_LOCAL_TASK_INDEX"
LOCAL_TASK_COUNT_ENV: Final = "ACSP_LOCAL_TASK_COUNT"
TASK_HOSTS_FILE_ENV: Final = "ACSP_TASK_HOSTS_FILE"
RENDEZVOUS_HOST_ENV: Final = "ACSP_RENDEZVOUS_HOST"
RENDEZVOUS_PORT_ENV: Final = "ACSP_RENDEZVOUS_PORT"

HOSTS_FOLDER: Final = "hosts"
"""Folder of the hosts files in the agent's state folder."""
_FOLDER_MODE: Final = 0o711
"""Tasks read their own file by name but cannot list the folder or write in it."""
_FILE_MODE: Final = 0o644


class Placement:
    """The nodes of one job's tasks, as a start command lists them."""

    __slots__ = ("node_hosts", "task_node_indexes")

    def __init__(self, node_hosts: Sequence[str], task_node_indexes: Sequence[int]) -> None:
        self.node_hosts = tuple(node_hosts)
        self.task_node_indexes = tuple(task_node_indexes)

    def check(self, task_index: int) -> str | None:
        """Return why the placement is invalid for task ``task_index``, or None if it is valid."""
        if not self.task_node_indexes:
            return "node_hosts without task_node_indexes" if self.node_hosts else None
        if task_index >= len(self.task_node_indexes):
            return (
                f"task index {task_index} is beyond the {len(self.task_node_indexes)} tasks "
                "of task_node_indexes"
            )
        if max(self.task_node_indexes) >= len(self.node_hosts):
            return (
                f"task_node_indexes refers to node {max(self.task_node_indexes)}, but "
                f"node_hosts has {len(self.node_hosts)} hosts"
            )
        return None

    def task_hosts(self, own_host: str) -> list[str]:
        """Return every task's host in task order; a one-task job's is ``own_host``."""
        if not self.task_node_indexes:
            return [own_host]
        return [self.node_hosts[index] for index in self.task_node_indexes]


def task_environment(
    task_index: int,
    placement: Placement,
    own_host: str,
    port: int,
    hosts_file: Path,
) -> tuple[tuple[str, str], ...]:
    """Return the rendezvous variables of task ``task_index``.

    ``placement`` passed :meth:`Placement.check`. ``port`` 0 (a scheduler that sends none)
    leaves ``ACSP_RENDEZVOUS_PORT`` unset.
    """
    indexes = placement.task_node_indexes
    if indexes:
        node = indexes[task_index]
        local_index = indexes[:task_index].count(node)
        local_count = indexes.count(node)
        rendezvous_host = placement.node_hosts[indexes[0]]
        count = len(indexes)
    else:
        local_index, local_count, rendezvous_host, count = 0, 1, own_host, 1
    env = [
        (TASK_COUNT_ENV, str(count)),
        (LOCAL_TASK_INDEX_ENV, str(local_index)),
        (LOCAL_TASK_COUNT_ENV, str(local_count)),
        (RENDEZVOUS_HOST_ENV, rendezvous_host),
        (TASK_HOSTS_FILE_ENV, str(hosts_file)),
    ]
    if port:
        env.append((RENDEZVOUS_PORT_ENV, str(port)))
    return tuple(env)


class HostFiles:
    """The hosts files of one node's tasks: one line per task of the job, in task order."""

    def __init__(self, state_dir: Path) -> None:
        # Absolute, because tasks run in another working directory than the agent.
        self._directory = state_dir.absolute() / HOSTS_FOLDER
        self._directory_made = False

    def path(self, task_id: str) -> Path:
        return self._directory / f"{task_file_stem(task_id)}.hosts"

    def _version_path(self, task_id: str) -> Path:
        return self._directory / f"{task_file_stem(task_id)}.hosts-version"

    def write(
        self,
        task_id: str,
        hosts: Sequence[str],
        issued_at_ns: int = 0,
        version: int = 0,
        sync: bool = False,
    ) -> Path:
        """Write ``task_id``'s hosts file, replacing any earlier one whole; raise OSError.

        ``version`` and ``issued_at_ns`` are the placement version and the time of the command
        that sent ``hosts``, kept so that :meth:`update` keeps the latest hosts. A version above
        0 goes to a file beside the hosts file, and the time becomes the hosts file's
        modification time (0 leaves the time of the write). ``sync`` flushes the files and then
        their folder to disk.
        """
        if not self._directory_made:
            self._directory.mkdir(mode=_FOLDER_MODE, parents=True, exist_ok=True)
            os.chmod(self._directory, _FOLDER_MODE)
            self._directory_made = True
        # The version goes first, so a crash between the two renames leaves a version ahead of
        # the hosts, and the redelivered command of that version still rewrites them.
        if version:
            self._replace(self._version_path(task_id), f"{version}\n".encode(), 0, sync)
        path = self.path(task_id)
        self._replace(path, "".join(f"{host}\n" for host in hosts).encode(), issued_at_ns, sync)
        if sync:
            # A rename reaches the disk with its folder, not with the file.
            descriptor = os.open(self._directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        return path

    @staticmethod
    def _replace(path: Path, data: bytes, modified_ns: int, sync: bool) -> None:
        """Replace ``path`` whole with ``data`` by a rename, so no reader sees it half-written."""
        temporary = path.with_name(f"{path.name}.tmp")
        descriptor = os.open(
            temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, _FILE_MODE
        )
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            if sync:
                os.fsync(descriptor)
            if modified_ns:
                os.utime(descriptor, ns=(modified_ns, modified_ns))
        # The umask may have cleared the read bits that task users need.
        os.chmod(temporary, _FILE_MODE)
        os.replace(temporary, path)

    def update(
        self, task_id: str, hosts: Sequence[str], issued_at_ns: int, version: int = 0
    ) -> bool:
        """Rewrite ``task_id``'s hosts file unless it contains later hosts; raise OSError.

        Hosts are later by ``version``, the command's placement version, and then by
        ``issued_at_ns``, its time. Return whether the file was written.

        NOTE: schedulers that send no version order a task's hosts by their clock alone, so a
        clock stepped back, or file times of one second, can let older hosts replace newer.
        """
        if self._written(task_id) > (version, issued_at_ns):
            return False
        self.write(task_id, hosts, issued_at_ns, version, sync=True)
        return True

    def _written(self, task_id: str) -> tuple[int, int]:
        """Return the placement version and time of the hosts in ``task_id``'s file.

        A file without a version file is of version 0, as written for the placement that the
        job started with or by a scheduler that sends no version. (0, 0) when there is no file.
        """
        try:
            written_ns = os.stat(self.path(task_id)).st_mtime_ns
        except FileNotFoundError:
            return (0, 0)
        try:
            text = self._version_path(task_id).read_text()
        except FileNotFoundError:
            return (0, written_ns)
        try:
            return (int(text), written_ns)
        except ValueError:
            logger.warning(
                "hosts version file of task %s is not a number (%r), so any later command may "
                "rewrite its hosts",
                task_id,
                text[:40],
            )
            return (0, written_ns)

    def forget(self, task_id: str) -> None:
        """Delete an ended task's hosts file and its version, if it has them."""
        try:
            self.path(task_id).unlink(missing_ok=True)
            self._version_path(task_id).unlink(missing_ok=True)
        except OSError as error:
            logger.warning("hosts file of task %s was not deleted: %s", task_id, error)

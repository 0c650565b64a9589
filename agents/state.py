"""The agent's state file: what must survive a restart of the agent process.

It stores, per node, the reserved end of the usage-sample sequence, the persistent health
conditions and the tasks the agent started. Each task keeps its pid and the kernel's start
time of the process, so that a restarted agent recognises its own processes and not a
reused pid. It also stores the start intents: tasks whose process is about to be spawned.
An intent is saved before the spawn, so a restarted agent looks for the process of every
intent that has no task record (see :meth:`agents.runner.TaskRunner.recover`).

Intents are saved to a small file of their own beside the state file (``state.json.intents``),
because the state file grows with the running tasks and a batch of starts should not write it
twice. Each intents file carries a number, and the state file records the number of the last
one written before it, so a restart reads the intents file only if it is newer. The state file
also contains the intents that are pending when it is written.

The file is JSON, replaced atomically (write to a temporary file, fsync, rename, fsync the
directory). Sequence numbers are reserved in blocks so that the file is not written for every
sample: after a crash the agent continues from the end of the last reserved block, leaving a
gap but never reusing a number.

A durable change made while an event loop runs (a task started or ended) is written once at the
end of the loop's current turn, together with the other changes of that turn. Until then it
blocks the spool like a new sequence block does, so nothing derived from it leaves the process
first. Callers that acknowledge commands call :meth:`StateStore.save_before_spool` before the
acknowledgement.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from agents.model import WHOLE_MILLI
from agents.private_files import private_opener
from services.runtime.errors import StartupError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
SEQUENCE_BLOCK = 10_000


@dataclass(slots=True)
class TaskRecord:
    """A task the agent started, as stored in the state file."""

    job_id: str
    task_id: str
    accelerators: list[str]
    started_at: float
    """Clock seconds (virtual seconds for the simulated backend) when the task started."""
    wall_time_s: float
    grace_period_s: float
    pid: int = 0
    """Process id of the task's process group leader; 0 for a played (processless) task."""
    process_start_ticks: int = 0
    """Start time of the process in clock ticks since boot (``/proc/<pid>/stat`` field 22)."""
    log_path: str = ""
    exit_path: str = ""
    """Unused; kept so that state files of earlier agents still load."""
    launcher_pid: int = 0
    """Pid of the launcher that started the process and records its exit status; 0 if none."""
    launcher_start_ticks: int = 0
    """Start time of that launcher in clock ticks since boot, which distinguishes a reused pid."""
    spawn_id: str = ""
    """Random id set in the process's environment, or empty for a played task.

    A restarted agent finds a process that it spawned but did not record by this id."""
    simulated_run_time_s: float = 0.0
    stop_reason: str = ""
    """Reason for the requested stop, or empty while no stop is requested."""
    stop_deadline: float = 0.0
    """Clock seconds after which a stopping task gets SIGKILL."""
    accelerator_millis: list[int] = field(default_factory=list)
    """Milli-shares of each of ``accelerators``; empty means whole ones."""
    ended_at: float = 0.0
    """Clock seconds when the task ended, for a task in the ended-task journal."""

    def share_of(self, uuid: str) -> int:
        """Return the task's milli-shares of accelerator ``uuid`` (1000 for a whole one)."""
        if not self.accelerator_millis:
            return WHOLE_MILLI
        return self.accelerator_millis[self.accelerators.index(uuid)]


@dataclass(slots=True)
class NodeState:
    sequence_next: int = 1
    sequence_reserved: int = 0
    usage_reported_until: float = 0.0
    """Clock seconds up to which usage went into the spool; a restart reports from here."""
    fencing_token: int = 0
    """Highest fencing token (scheduler leader epoch) of a command the node acted on."""
    sample_series: str = ""
    """Random id in the node's usage-sample ids, made when its state starts empty.

    Metering drops a sample whose id it has stored, so an agent whose state file was lost
    or moved away must not hand out ``<node>/1`` again. Empty for state written before the
    series existed, whose ids stay ``<node>/<sequence>``."""
    health: dict[str, list[str]] = field(default_factory=dict)
    tasks: dict[str, TaskRecord] = field(default_factory=dict)
    intents: dict[str, TaskRecord] = field(default_factory=dict)
    """Tasks whose process is about to be spawned, by task id; the pid is not known yet."""
    ended: dict[str, TaskRecord] = field(default_factory=dict)
    """Tasks of the ended-task journal that ended after the last usage report, as loaded."""


class StateStore:
    """The state of every node an agent process serves, backed by one JSON file."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._nodes: dict[str, NodeState] = {}
        self._dirty = False
        self._spool_guard_unsaved = False
        self._intents_unsaved = False
        self._intents_sequence = 0
        """Number of the last intents file written; the state file records the one it covers."""
        self._save_scheduled = False
        self._journal: list[tuple[str, float, str]] = []
        """Lines of the ended-task journal: node key, end time and the line itself."""
        self._journal_unsaved: list[str] = []
        self._journal_pruned = False
        if path.exists():
            self._load()
        self._load_intents()
        self._load_journal()

    @property
    def path(self) -> Path:
        return self._path

    @property
    def files(self) -> tuple[Path, ...]:
        """The state file, and the intents file and ended-task journal beside it."""
        return (self._path, self._intents_path, self._journal_path)

    @property
    def nodes(self) -> dict[str, NodeState]:
        return self._nodes

    def node(self, key: str) -> NodeState:
        state = self._nodes.get(key)
        if state is None:
            state = self._nodes[key] = NodeState(sample_series=uuid.uuid4().hex[:12])
        return state

    def sample_id(self, key: str, sequence: int) -> str:
        """Return the id of the node's usage sample number ``sequence``."""
        series = self.node(key).sample_series
        return f"{key}/{series}/{sequence}" if series else f"{key}/{sequence}"

    def next_sequence(self, key: str) -> int:
        """Return the node's next usage-sample sequence number; it is never handed out twice.

        A new block is reserved in memory only: the caller must :meth:`save_before_spool`
        before the number leaves the process (the outbox does so before it appends to the
        spool).
        """
        state = self.node(key)
        if state.sequence_next > state.sequence_reserved:
            state.sequence_reserved = state.sequence_next + SEQUENCE_BLOCK - 1
            self._dirty = True
            self._spool_guard_unsaved = True
        value = state.sequence_next
        state.sequence_next += 1
        return value

    def set_health(self, key: str, persistent: dict[str, list[str]]) -> None:
        state = self.node(key)
        if state.health != persistent:
            state.health = persistent
            self.save()

    def put_task(self, key: str, record: TaskRecord, durable: bool = True) -> None:
        """Store ``record``.

        A durable change is written before the spool takes another message, and by the end of
        the current event loop turn. Outside an event loop it is written at once. A change that
        is not durable waits for the next flush.
        """
        self.node(key).tasks[record.task_id] = record
        self._save_or_mark(durable)

    def remove_task(self, key: str, task_id: str, durable: bool = True) -> None:
        if self.node(key).tasks.pop(task_id, None) is not None:
            self._save_or_mark(durable)

    def end_task(self, key: str, task_id: str, ended_at: float) -> None:
        """Remove a task that ended at ``ended_at`` and whose usage up to then is unreported.

        The task goes to the ended-task journal, a file beside the state file that the next
        save appends to before it writes the state. One line per task keeps the cost of a save
        independent of how many tasks ended since the last usage report. A restarted agent
        reports their usage from the node's usage mark up to each end.
        """
        record = self.node(key).tasks.get(task_id)
        if record is None:
            return
        record.ended_at = ended_at
        fields = _task_fields(record)
        fields["node"] = key
        line = _encode(fields).decode()
        self._journal.append((key, ended_at, line))
        self._journal_unsaved.append(line)
        self.remove_task(key, task_id)

    def prune_ended(self, key: str, until: float) -> None:
        """Drop the node's journal lines of tasks that ended by ``until``, a reported time."""
        kept = [entry for entry in self._journal if entry[0] != key or entry[1] > until]
        if len(kept) < len(self._journal):
            self._journal = kept
            self._journal_pruned = True
            self._dirty = True

    def put_intent(self, key: str, record: TaskRecord) -> None:
        """Store the intent to spawn ``record``'s process; :meth:`save_intents` writes it."""
        intents = self.node(key).intents
        if intents.get(record.task_id) is record:
            return
        intents[record.task_id] = record
        self._dirty = True
        self._intents_unsaved = True

    def remove_intent(self, key: str, task_id: str) -> None:
        """Forget an intent in memory; the next save writes the file without it.

        A restarted agent that still finds the intent also finds its task record, or its
        process, or neither, and handles each case (:meth:`agents.runner.TaskRunner.recover`).
        """
        if self.node(key).intents.pop(task_id, None) is not None:
            self._dirty = True

    def save_intents(self) -> None:
        """Write the pending intents, if one was added since the last save; call before spawning.

        Only the intents are written, with one fsync, to the intents file.
        """
        if not self._intents_unsaved:
            return
        self._intents_sequence += 1
        document = {
            "version": FORMAT_VERSION,
            "sequence": self._intents_sequence,
            "nodes": {
                key: list(state.intents.values())
                for key, state in self._nodes.items()
                if state.intents
            },
        }
        _write_atomically(self._intents_path, _encode(document))
        self._intents_unsaved = False

    @property
    def _intents_path(self) -> Path:
        return self._path.with_suffix(self._path.suffix + ".intents")

    def _save_or_mark(self, durable: bool) -> None:
        self._dirty = True
        if not durable:
            return
        self._spool_guard_unsaved = True
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.save()
            return
        # One write and fsync for every durable change of this loop turn.
        if not self._save_scheduled:
            self._save_scheduled = True
            loop.call_soon(self._scheduled_save)

    def _scheduled_save(self) -> None:
        self._save_scheduled = False
        self.save_before_spool()

    def flush(self) -> None:
        """Write the file if a change was only marked (``durable=False``) since the last save."""
        if self._dirty:
            self.save()

    def raise_fencing_token(self, key: str, token: int) -> None:
        """Record a higher fencing token for the node and write the file at once.

        Written before the command that carries it is acted on, so a restarted agent still
        ignores commands of older scheduler leaders. Tokens rise only when leadership moves,
        so this write is rare.
        """
        self.node(key).fencing_token = token
        self.save()

    def set_fencing_token(self, key: str, token: int) -> None:
        """Record a higher fencing token in memory; the caller saves before acting on it.

        A batch of commands that brings a new leader's token to many nodes then costs one
        write instead of one per node.
        """
        self.node(key).fencing_token = token
        self._dirty = True
        self._spool_guard_unsaved = True

    def mark_usage_reported(self, key: str, until: float) -> None:
        """Record that the node's usage up to ``until`` is reported; saved before spooling."""
        self.node(key).usage_reported_until = until
        self._dirty = True
        self._spool_guard_unsaved = True

    def save_before_spool(self) -> None:
        """Write the file if a sequence block, a usage mark or a task changed since the last save.

        Saving before the spool append means a crash between the two loses that usage
        interval rather than reporting it twice under new sample ids, and that a task is never
        reported started or ended unless the file records it too.
        """
        if self._spool_guard_unsaved:
            self.save()

    def save(self) -> None:
        self._save_journal()
        nodes: dict[str, dict[str, Any]] = {}
        for key, state in self._nodes.items():
            node: dict[str, Any] = {
                # A restart continues after the reserved block, never inside it.
                "sequence_reserved": state.sequence_reserved,
                "usage_reported_until": state.usage_reported_until,
                "fencing_token": state.fencing_token,
                "sample_series": state.sample_series,
                "health": state.health,
                "tasks": list(state.tasks.values()),
            }
            if state.intents:
                node["intents"] = list(state.intents.values())
            nodes[key] = node
        document = {
            "version": FORMAT_VERSION,
            "intents_sequence": self._intents_sequence,
            "nodes": nodes,
        }
        _write_atomically(self._path, _encode(document))
        self._dirty = False
        self._spool_guard_unsaved = False
        self._intents_unsaved = False

    def _load(self) -> None:
        document = _read_document(self._path)
        if document.get("version") != FORMAT_VERSION:
            raise StateFileError(
                f"state file {self._path}",
                f"format version {document.get('version')!r}, expected {FORMAT_VERSION}",
                "run the agent version that wrote it, or move it away to start without state",
            )
        try:
            self._load_nodes(document)
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            raise _damaged(self._path, f"{type(error).__name__}: {error}") from None
        logger.info("loaded agent state for %d nodes from %s", len(self._nodes), self._path)

    def _load_nodes(self, document: dict[str, Any]) -> None:
        for key, raw in document.get("nodes", {}).items():
            reserved = int(raw.get("sequence_reserved", 0))
            state = NodeState(
                sequence_next=reserved + 1,
                sequence_reserved=reserved,
                usage_reported_until=float(raw.get("usage_reported_until", 0.0)),
                fencing_token=int(raw.get("fencing_token", 0)),
                sample_series=str(raw.get("sample_series", "")),
                health={uuid: list(causes) for uuid, causes in raw.get("health", {}).items()},
                tasks={t["task_id"]: TaskRecord(**t) for t in raw.get("tasks", [])},
                intents={t["task_id"]: TaskRecord(**t) for t in raw.get("intents", [])},
            )
            self._nodes[key] = state
        self._intents_sequence = int(document.get("intents_sequence", 0))

    @property
    def _journal_path(self) -> Path:
        return self._path.with_suffix(self._path.suffix + ".ended")

    def _save_journal(self) -> None:
        """Append the new journal lines (one fsync), or rewrite the file after a prune."""
        if self._journal_pruned:
            text = "".join(line + "\n" for _key, _ended_at, line in self._journal)
            _write_atomically(self._journal_path, text)
        elif self._journal_unsaved:
            with open(self._journal_path, "a", encoding="utf-8", opener=private_opener) as file:
                file.write("".join(line + "\n" for line in self._journal_unsaved))
                file.flush()
                os.fsync(file.fileno())
        self._journal_unsaved.clear()
        self._journal_pruned = False

    def _load_journal(self) -> None:
        """Read the ended-task journal; a line cut short by a crash is skipped."""
        path = self._journal_path
        if not path.exists():
            return
        try:
            data = path.read_bytes()
        except OSError as error:
            raise _unreadable(f"ended-task journal {path}", path, error) from None
        # A byte that is not UTF-8 damages its line only, which the loop below skips.
        for line in data.decode("utf-8", errors="replace").splitlines():
            try:
                fields = json.loads(line)
                key = fields.pop("node")
                record = TaskRecord(**fields)
            except (ValueError, TypeError, KeyError):
                logger.warning(
                    "skipping a damaged line of %s; it is dropped at the next save", path
                )
                # Rewritten at the next save, so that no new line follows the damaged one.
                self._journal_pruned = True
                continue
            self._journal.append((key, record.ended_at, line))
            self.node(key).ended[record.task_id] = record

    def _load_intents(self) -> None:
        """Add the intents of an intents file newer than the state file to the nodes."""
        path = self._intents_path
        if not path.exists():
            return
        document = _read_document(path)
        try:
            sequence = int(document.get("sequence", 0))
            if sequence <= self._intents_sequence:
                return
            intents = {
                key: [TaskRecord(**fields) for fields in records]
                for key, records in document.get("nodes", {}).items()
            }
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            raise _damaged(path, f"{type(error).__name__}: {error}") from None
        self._intents_sequence = sequence
        for key, records in intents.items():
            state = self.node(key)
            for record in records:
                state.intents.setdefault(record.task_id, record)
        logger.info("loaded start intents number %d from %s", sequence, path)


class StateFileError(StartupError, ValueError):
    """A state file that cannot be read or parsed; ``str()`` names the file, the reason, the fix."""


def _damaged(path: Path, reason: str) -> StateFileError:
    return StateFileError(
        f"state file {path}",
        f"damaged ({reason})",
        "restore it from a backup, or move it away to start without state; the agent then "
        "no longer knows the tasks it lists",
    )


def _unreadable(what: str, path: Path, error: OSError) -> StateFileError:
    """Return the error for a state file that cannot be read, with the fix for the reader."""
    fix = "give the agent read and write access to its state folder"
    try:
        owner = path.stat().st_uid
    except OSError:
        owner = os.geteuid()
    if isinstance(error, PermissionError) and owner != os.geteuid():
        # The agent creates its files with mode 0600, so a tool run as another user, such as
        # `acsp agent tasks`, cannot read them.
        fix = f"run this as the agent's user (uid {owner}) or as root"
    return StateFileError(what, f"cannot be read: {error.strerror or error}", fix)


def _read_document(path: Path) -> dict[str, Any]:
    """Read a JSON object from ``path``, raising :class:`StateFileError` for anything else."""
    try:
        with open(path, encoding="utf-8") as file:
            document = json.load(file)
    except OSError as error:
        raise _unreadable(f"state file {path}", path, error) from None
    except ValueError as error:
        raise _damaged(path, f"invalid JSON: {error}") from None
    if not isinstance(document, dict):
        raise _damaged(path, "not a JSON object")
    return document


_TASK_FIELDS = tuple(f.name for f in dataclasses.fields(TaskRecord))


def _task_fields(record: TaskRecord) -> dict[str, Any]:
    # Faster than dataclasses.asdict, which deep-copies every value.
    return {name: getattr(record, name) for name in _TASK_FIELDS}


def _encode(document: dict[str, Any]) -> bytes:
    """Encode ``document``, whose task records may be dataclasses, as compact JSON.

    orjson encodes the records about four times as fast as the standard json module, but it
    rejects strings with unpaired surrogates, which a path decoded with ``surrogateescape``
    contains. Such a document is written by the json module, which escapes them.
    """
    try:
        return orjson.dumps(document)
    except TypeError:
        return json.dumps(document, separators=(",", ":"), default=_task_fields).encode()


def _write_atomically(path: Path, content: str | bytes) -> None:
    """Replace ``path`` with ``content``: write a temporary file, fsync, rename, fsync the folder.

    Text is written as UTF-8.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(path.suffix + ".tmp")
    data = content.encode() if isinstance(content, str) else content
    with open(temporary, "wb", opener=private_opener) as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)

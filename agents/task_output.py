"""Replies to the scheduler's requests for the end of a task's log.

The scheduler sends an ``acsp.v1.TaskOutputRequest`` over core NATS on
``acsp.output.<provider>.<region>.<node>`` and waits a few seconds for the
``TaskOutputReply`` on the request's reply subject. The agent reads the log in a worker
thread, so a slow disk holds up no timer or command.

The agent never deletes a task's log, because its presence shows a restarted agent that the
task ran (:meth:`agents.runner.TaskRunner.start`). So the log of every task that ran a process
here is found after the task ended, until an operator removes it or the state directory.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Final

from google.protobuf.message import DecodeError

from acsp.v1 import agent_pb2
from agents.task_logs import UnreadableLogError, read_tail

logger = logging.getLogger(__name__)

REPLY_RESERVE_BYTES: Final = 4096
"""Bytes of the server's max_payload kept for the reply's other fields and its headers."""
MAX_TASK_ID_LENGTH: Final = 256
"""Maximum length of a task id, in characters; the scheduler's ids are far shorter."""


async def output_reply(
    log_path: Callable[[str], Path] | None, node_key: str, data: bytes, max_payload: int
) -> agent_pb2.TaskOutputReply:
    """Build the reply to one encoded ``TaskOutputRequest`` for the node ``node_key``.

    ``log_path`` maps a task id to its log (:meth:`agents.runner.TaskRunner.log_path`), and
    is None while the node has no task runner.

    The output is cut to fit a message of ``max_payload`` bytes, with ``truncated`` set if the
    log is longer.
    """
    try:
        request = agent_pb2.TaskOutputRequest.FromString(data)
    except DecodeError as error:
        return _failed(f"the request is not a TaskOutputRequest: {error}")
    task_id = request.task_id
    if not task_id or len(task_id) > MAX_TASK_ID_LENGTH:
        return _failed(f"invalid task_id: must have 1 to {MAX_TASK_ID_LENGTH} characters")
    if request.max_bytes < 1:
        return _failed("invalid max_bytes: must be at least 1")
    # Messages name the node as provider/region/node, the way the CLI and the scheduler show it.
    node = node_key.replace(".", "/")
    if log_path is None:
        return _not_found(f"node {node} has not started its task runner yet")
    limit = min(request.max_bytes, max(1, max_payload - REPLY_RESERVE_BYTES))
    path = str(log_path(task_id))
    try:
        tail = await asyncio.to_thread(read_tail, path, limit)
    except FileNotFoundError:
        return _not_found(
            f"node {node} has no log of task {task_id}: no process of it started here, "
            "or the log was removed"
        )
    except UnreadableLogError as error:
        logger.warning("log of task %s not returned: %s", task_id, error)
        return _failed(f"the log of task {task_id} on node {node} is unusable: {error}")
    except OSError as error:
        logger.warning("cannot read the log of task %s at %s: %s", task_id, path, error)
        return _failed(f"reading the log of task {task_id} on node {node} failed: {error}")
    return agent_pb2.TaskOutputReply(
        status=agent_pb2.TASK_OUTPUT_STATUS_OK,
        output=tail.data,
        truncated=tail.truncated,
    )


def _failed(message: str) -> agent_pb2.TaskOutputReply:
    return agent_pb2.TaskOutputReply(status=agent_pb2.TASK_OUTPUT_STATUS_FAILED, message=message)


def _not_found(message: str) -> agent_pb2.TaskOutputReply:
    return agent_pb2.TaskOutputReply(status=agent_pb2.TASK_OUTPUT_STATUS_NOT_FOUND, message=message)

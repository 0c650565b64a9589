"""The environment variables that acsp sets for tasks, which a job may therefore not set.

The node agent adds these to a task's environment after the job's own variables, so a value
that a job sets for one of them never reaches the task. The scheduler rejects a job that sets
one, so that the value is not lost without a word. docs/architecture.md, "What a task sees",
describes each variable.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

JOB_ID: Final = "ACSP_JOB_ID"
TASK_ID: Final = "ACSP_TASK_ID"
TASK_INDEX: Final = "ACSP_TASK_INDEX"
SPAWN_ID: Final = "ACSP_SPAWN_ID"
CHECKPOINT_FILE: Final = "ACSP_CHECKPOINT_FILE"
CHECKPOINT_REF: Final = "ACSP_CHECKPOINT_REF"
ARRAY_INDEX: Final = "ACSP_ARRAY_INDEX"
TASK_COUNT: Final = "ACSP_TASK_COUNT"
LOCAL_TASK_INDEX: Final = "ACSP_LOCAL_TASK_INDEX"
LOCAL_TASK_COUNT: Final = "ACSP_LOCAL_TASK_COUNT"
TASK_HOSTS_FILE: Final = "ACSP_TASK_HOSTS_FILE"
RENDEZVOUS_HOST: Final = "ACSP_RENDEZVOUS_HOST"
RENDEZVOUS_PORT: Final = "ACSP_RENDEZVOUS_PORT"
VISIBLE_DEVICES: Final = "CUDA_VISIBLE_DEVICES"
"""The variable that names a task's accelerators; every accelerator backend of the agent sets
this one, NVIDIA's, with the accelerators' UUIDs."""

RESERVED_VARIABLES: Final[Mapping[str, str]] = {
    JOB_ID: "the job's id",
    TASK_ID: "the task's id",
    TASK_INDEX: "the task's index in its job",
    SPAWN_ID: "the id that marks the task's processes",
    CHECKPOINT_FILE: "the file the task writes its checkpoint reference to",
    CHECKPOINT_REF: "the checkpoint reference the task resumes from",
    ARRAY_INDEX: "an array element's index (acsp jobs submit --array)",
    TASK_COUNT: "the number of tasks in the job",
    LOCAL_TASK_INDEX: "the task's index among the job's tasks on its node",
    LOCAL_TASK_COUNT: "the number of the job's tasks on the task's node",
    TASK_HOSTS_FILE: "the file with the host of each task's node",
    RENDEZVOUS_HOST: "the host of task 0's node",
    RENDEZVOUS_PORT: "the port for task 0 to listen on",
    VISIBLE_DEVICES: "the UUIDs of the task's accelerators",
}
"""The value that acsp gives each reserved variable, by name. The scheduler sets
``ACSP_ARRAY_INDEX`` when it creates an array's elements, and the node agent sets the others
when it starts a task, some only when they apply (``ACSP_CHECKPOINT_REF`` on a resume)."""

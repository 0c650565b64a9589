"""Checks on a job submission, each failure naming the field, the value and the fix."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Final

from acsp.subjects import TOKEN_PATTERN
from acsp.task_environment import RESERVED_VARIABLES
from acsp.v1 import agent_pb2
from scheduler.engine.catalog import AcceleratorModel, Catalog
from scheduler.engine.spec import MAX_TASKS
from services.runtime.errors import InvalidArgument

from .model import MILLIS_PER_ACCELERATOR, PRIORITY_CLASSES, TOPOLOGIES, JobSpec

MAX_MILLIS_PER_TASK: Final = 64 * MILLIS_PER_ACCELERATOR
MAX_WALL_TIME_S: Final = 60 * 86_400
"""Sixty days; longer work needs an advance reservation arranged with the program office."""
MAX_GRACE_S: Final = 3600
MAX_ARRAY_SIZE: Final = 10_000
MAX_BATCH_JOBS: Final = MAX_ARRAY_SIZE
"""Jobs one SubmitJobs call may create, array elements included, so one largest array fits."""
MAX_NAME_LENGTH: Final = 128
MAX_COMMAND_BYTES: Final = 64 * 1024
MAX_COMMAND_ARGS: Final = 4096
MAX_ENV_VARS: Final = 512
MAX_ENV_VALUE_BYTES: Final = 32 * 1024
MAX_ENV_BYTES: Final = 128 * 1024
"""Keys and values of the environment together, in UTF-8 bytes."""
MAX_CHECKPOINT_REF_BYTES: Final = 4096
MAX_MODELS: Final = 64
"""Accepted models of one job, well above the size of the accelerator catalog."""
MAX_ALLOWED_REGIONS: Final = 256
"""Entries of a job's allowed regions; a longer list is better written as jurisdictions. Every
stored job, listing and watch carries the whole list."""
MAX_REGIONS_SHOWN: Final = 10
"""Known regions that the error for an unknown region lists before it counts the rest."""
MAX_REQUEST_ID_LENGTH: Final = 200
"""Characters of a request id, the grant service's limit too. Request ids are unique keys
of btree indexes, which reject rows of more than about 2,700 bytes."""
MAX_REASON_LENGTH: Final = 1024
"""Characters of a free-text reason (cancel, drain, node down, recall). The scheduler stores
it with the change and copies it into replies, job watches and events."""
DEFAULT_MAX_PAYLOAD: Final = 1024 * 1024
"""nats-server's default ``max_payload``, used when no server has reported its own."""
VENDORS: Final = ("", "nvidia", "amd", "huawei", "cambricon", "other")

_ENV_NAME: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_ID: Final = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
JURISDICTION_PREFIX: Final = "jurisdiction:"
JURISDICTION_CODE: Final = re.compile(r"[A-Z]{2,8}")
"""A region's jurisdiction, e.g. ``CN`` or ``EU``; allowed regions name it after the prefix."""

_Reporter = Callable[[str, str], None]


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One invalid field of a request."""

    field: str
    """Dotted path of the field, as named in the protobuf request."""
    reason: str
    """What is wrong and how to fix it."""


class InvalidJobSpec(ValueError):
    """A submission failed validation; ``violations`` lists every invalid field."""

    def __init__(self, violations: list[FieldViolation]) -> None:
        self.violations = tuple(violations)
        super().__init__("; ".join(f"{v.field}: {v.reason}" for v in violations))


def validate_spec(
    spec: JobSpec,
    prefix: str = "spec",
    jurisdictions: Collection[str] | None = None,
    max_payload: int = DEFAULT_MAX_PAYLOAD,
    *,
    regions: Collection[str] | None = None,
) -> list[FieldViolation]:
    """Return every violation in ``spec``; an empty list means it is valid.

    ``jurisdictions`` are the codes registered regions declare; a ``jurisdiction:<code>``
    entry of the allowed regions must name one of them. ``regions`` are the ``provider/region``
    keys of the registered regions and of the regions of known nodes; a ``provider/region``
    entry must be one of them. ``None`` for either checks only the syntax.
    ``max_payload`` is the NATS server's largest message in bytes, which bounds the start
    command every task of the job is sent as.
    """
    out: list[FieldViolation] = []

    def bad(name: str, reason: str) -> None:
        out.append(FieldViolation(f"{prefix}.{name}", reason))

    if len(spec.name) > MAX_NAME_LENGTH:
        bad("name", f"is {len(spec.name)} characters long; use at most {MAX_NAME_LENGTH}")
    _check_ids(spec, bad)
    _check_command(spec, bad)
    if not 1 <= spec.task_count <= MAX_TASKS:
        bad("task_count", f"is {spec.task_count}; use 1 to {MAX_TASKS}")
    _check_millis(spec, bad)
    if not 1 <= spec.wall_time_s <= MAX_WALL_TIME_S:
        bad("wall_time_seconds", f"is {spec.wall_time_s}; use 1 to {MAX_WALL_TIME_S}")
    if not 0 <= spec.grace_s <= MAX_GRACE_S:
        bad("grace_seconds", f"is {spec.grace_s}; use 0 to {MAX_GRACE_S}")
    if spec.priority not in PRIORITY_CLASSES:
        bad("priority_class", f"{spec.priority!r} is unknown; use {', '.join(PRIORITY_CLASSES)}")
    if spec.topology not in TOPOLOGIES:
        bad("topology", f"{spec.topology!r} is unknown")
    elif _fractional_gang_in_one_domain(spec):
        bad(
            "topology",
            f"is {spec.topology}, which a multi-task job with a share of one accelerator per "
            "task cannot use; use same_region or same_provider, or whole accelerators per task",
        )
    if spec.vendor not in VENDORS:
        bad("accelerators.vendor", f"{spec.vendor!r} is unknown")
    if len(spec.models) > MAX_MODELS:
        bad("accelerators.models", f"has {len(spec.models)} entries; use at most {MAX_MODELS}")
    if len(spec.allowed_regions) > MAX_ALLOWED_REGIONS:
        bad(
            "allowed_regions",
            f"has {len(spec.allowed_regions)} entries; use at most {MAX_ALLOWED_REGIONS}, or "
            "name jurisdictions instead of single regions",
        )
    for i, model in enumerate(spec.models):
        if not TOKEN_PATTERN.match(model):
            bad(f"accelerators.models[{i}]", f"{model!r} is not a catalog model name")
    for i, entry in enumerate(spec.allowed_regions):
        reason = _region_entry_problem(entry, jurisdictions, regions)
        if reason:
            bad(f"allowed_regions[{i}]", reason)
    _check_env(spec, bad)
    ref_bytes = len(spec.checkpoint_ref.encode())
    if ref_bytes > MAX_CHECKPOINT_REF_BYTES:
        bad(
            "checkpoint_reference",
            f"is {ref_bytes} bytes; use at most {MAX_CHECKPOINT_REF_BYTES}",
        )
    if not out:
        _check_command_size(spec, max_payload, bad)
    # Infinity and NaN have no JSON form, so the stored spec could not be written.
    if not math.isfinite(spec.simulated_run_s) or spec.simulated_run_s < 0:
        bad(
            "simulated_run_seconds",
            f"is {spec.simulated_run_s}; use 0 or a finite positive number of seconds",
        )
    return out


def validate_models(spec: JobSpec, catalog: Catalog, prefix: str = "spec") -> list[FieldViolation]:
    """Check the accelerator request against ``catalog``, the engine's models.

    Every named model must be in the catalog. The vendor, memory and software stack
    constraint must match at least one accepted model, because otherwise the job never starts.
    """
    out: list[FieldViolation] = []
    field = f"{prefix}.accelerators"
    names = catalog.names()
    unknown = [m for m in spec.models if m not in catalog]
    for i, model in enumerate(spec.models):
        if model in unknown:
            out.append(
                FieldViolation(
                    f"{field}.models[{i}]",
                    f"{model!r} is not in the accelerator catalog; use one of {', '.join(names)}",
                )
            )
    if unknown:
        return out
    accepted = [catalog.get(m) for m in spec.models] or [catalog.get(n) for n in names]
    if spec.vendor and not any(m.vendor == spec.vendor for m in accepted):
        vendors = ", ".join(sorted({m.vendor for m in accepted}))
        out.append(
            FieldViolation(
                f"{field}.vendor",
                f"no accepted model is made by {spec.vendor!r}; accepted models come from "
                f"{vendors}",
            )
        )
    elif not any(model_meets(m, spec) for m in accepted):
        of_vendor = [m for m in accepted if not spec.vendor or m.vendor == spec.vendor]
        largest = max(m.memory_gib for m in of_vendor)
        if spec.min_memory_gib > largest:
            out.append(
                FieldViolation(
                    f"{field}.min_memory_gib",
                    f"is {spec.min_memory_gib}; no accepted model has more than {largest} GiB",
                )
            )
        else:
            stacks = ", ".join(sorted({m.software_stack for m in of_vendor}))
            out.append(
                FieldViolation(
                    f"{field}.software_stack",
                    f"{spec.software_stack!r} matches no accepted model with the other "
                    f"constraints; accepted models use {stacks}",
                )
            )
    return out


def model_meets(model: AcceleratorModel, spec: JobSpec) -> bool:
    """Return whether ``model`` meets the job's constraint, as the engine matches it."""
    if spec.vendor and model.vendor != spec.vendor:
        return False
    if model.memory_gib < spec.min_memory_gib:
        return False
    return model.software_stack.startswith(spec.software_stack)


def validate_array_size(size: int, field: str = "spec.array_size") -> list[FieldViolation]:
    """Check the size of a job array; 0 means a single job."""
    if not 0 <= size <= MAX_ARRAY_SIZE:
        return [FieldViolation(field, f"is {size}; use 0 (no array) to {MAX_ARRAY_SIZE}")]
    return []


def check_length(field: str, value: str, limit: int) -> None:
    """Raise INVALID_ARGUMENT naming ``field`` when ``value`` has more than ``limit`` characters."""
    if len(value) > limit:
        raise InvalidArgument(
            field, f"is {len(value)} characters long", f"use at most {limit} characters"
        )


def validate_batch_size(array_sizes: Sequence[int]) -> list[FieldViolation]:
    """Check the number of jobs that a SubmitJobs call of these array sizes would create."""
    total = sum(max(size, 1) for size in array_sizes)
    if total <= MAX_BATCH_JOBS:
        return []
    return [
        FieldViolation(
            "jobs",
            f"would create {total} jobs, counting array elements; send at most "
            f"{MAX_BATCH_JOBS} per call and the rest in further calls",
        )
    ]


def _check_ids(spec: JobSpec, bad: _Reporter) -> None:
    if not spec.project_id:
        bad("project_id", "is missing; name the project the job runs for")
    elif not _ID.match(spec.project_id):
        bad("project_id", f"{spec.project_id!r} is not a valid project id")
    if spec.grant_id and not _ID.match(spec.grant_id):
        bad("grant_id", f"{spec.grant_id!r} is not a valid grant id")
    if spec.sub_allocation_id and not _ID.match(spec.sub_allocation_id):
        bad("sub_allocation_id", f"{spec.sub_allocation_id!r} is not a valid id")
    elif spec.sub_allocation_id and not spec.grant_id:
        bad(
            "grant_id",
            "is missing; a sub-allocation is part of one grant, so name the grant that "
            f"{spec.sub_allocation_id!r} belongs to",
        )


def _check_command(spec: JobSpec, bad: _Reporter) -> None:
    if not spec.command or not spec.command[0]:
        bad("command", "is empty; give the program to run and its arguments")
        return
    if len(spec.command) > MAX_COMMAND_ARGS:
        bad("command", f"has {len(spec.command)} arguments; use at most {MAX_COMMAND_ARGS}")
    size = sum(len(arg.encode()) for arg in spec.command)
    if size > MAX_COMMAND_BYTES:
        bad("command", f"is {size} bytes; use at most {MAX_COMMAND_BYTES}")
    if any("\x00" in arg for arg in spec.command):
        bad("command", "contains a NUL character")


def _check_env(spec: JobSpec, bad: _Reporter) -> None:
    # The whole environment is checked first, so its violation leads a long list.
    if len(spec.env) > MAX_ENV_VARS:
        bad("environment", f"has {len(spec.env)} variables; use at most {MAX_ENV_VARS}")
    total = sum(len(key.encode()) + len(value.encode()) for key, value in spec.env)
    if total > MAX_ENV_BYTES:
        bad(
            "environment",
            f"keys and values are {total} bytes in all; use at most {MAX_ENV_BYTES} and pass "
            "larger data as a file",
        )
    for key, value in spec.env:
        field = f"environment[{_quote_key(key)}]"
        if not _ENV_NAME.match(key):
            bad(
                field,
                "is not a valid environment variable name; use 1 to 128 ASCII letters, digits and "
                "underscores that do not start with a digit, e.g. OMP_NUM_THREADS",
            )
        size = len(value.encode())
        if size > MAX_ENV_VALUE_BYTES:
            bad(
                field,
                f"value is {size} bytes; use at most {MAX_ENV_VALUE_BYTES} and pass larger "
                "data as a file",
            )
        if "\x00" in value:
            bad(field, "value contains a NUL character")
        described = RESERVED_VARIABLES.get(key)
        if described is not None:
            bad(
                field,
                f"is reserved, because acsp sets it to {described} when it starts a task, "
                "replacing the job's value; leave it out, or pass the value under another name",
            )


def _quote_key(key: str) -> str:
    """Quote an environment key for a field path, cut to a readable length."""
    if len(key) <= _ENV_KEY_SHOWN:
        return repr(key)
    return f"{key[:_ENV_KEY_SHOWN]!r}... ({len(key)} characters)"


_ENV_KEY_SHOWN: Final = 64


def max_command_bytes(max_payload: int) -> int:
    """Return the largest encoded job spec part of a start command, in bytes.

    Half of ``max_payload`` goes to the command, environment and checkpoint reference. The
    other half is left for the task's ids, its accelerators, the message headers and a gang's
    node hosts (at most 4,096 hosts of 100 characters, 420 KiB encoded), so every start command
    of a valid job fits one NATS message of the default max_payload of 1 MiB.
    """
    return max_payload // 2


def _check_command_size(spec: JobSpec, max_payload: int, bad: _Reporter) -> None:
    command = agent_pb2.AgentCommand(
        command=spec.command,
        environment=dict(spec.env),
        checkpoint_reference=spec.checkpoint_ref,
    )
    size = command.ByteSize()
    limit = max_command_bytes(max_payload)
    if size > limit:
        bad(
            "command",
            f"with its environment and checkpoint reference encodes to {size} bytes, over "
            f"the {limit} bytes a start command may carry (half the NATS max_payload of "
            f"{max_payload}); shorten them or pass the data as a file",
        )


def _fractional_gang_in_one_domain(spec: JobSpec) -> bool:
    fractional = 0 < spec.accelerator_millis_per_task < MILLIS_PER_ACCELERATOR
    one_domain = spec.topology in ("same_node", "same_interconnect_domain")
    return fractional and spec.task_count > 1 and one_domain


def _check_millis(spec: JobSpec, bad: _Reporter) -> None:
    millis = spec.accelerator_millis_per_task
    name = "accelerator_millis_per_task"
    if millis <= 0:
        bad(name, f"is {millis}; use 1-999 for a share of one accelerator or multiples of 1000")
    elif millis > MAX_MILLIS_PER_TASK:
        bad(name, f"is {millis}; use at most {MAX_MILLIS_PER_TASK}")
    elif millis > MILLIS_PER_ACCELERATOR and millis % MILLIS_PER_ACCELERATOR:
        bad(name, f"is {millis}; above 1000 use a whole multiple of 1000")


def _region_entry_problem(
    entry: str, jurisdictions: Collection[str] | None, regions: Collection[str] | None
) -> str:
    """Return what is wrong with one allowed-region entry, or an empty string."""
    if entry.startswith(JURISDICTION_PREFIX):
        code = entry.removeprefix(JURISDICTION_PREFIX)
        if not JURISDICTION_CODE.fullmatch(code):
            return f"{entry!r}: the jurisdiction code must be 2 to 8 capital letters, e.g. EU"
        if jurisdictions is not None and code not in jurisdictions:
            known = ", ".join(sorted(jurisdictions)) or "none"
            return (
                f"{entry!r} names a jurisdiction no registered region declares "
                f"(registered: {known}); name a registered one or list '<provider>/<region>'"
            )
        return ""
    if not _valid_region_entry(entry):
        return f"{entry!r} is neither '<provider>/<region>' nor 'jurisdiction:<CODE>'"
    if regions is not None and entry not in regions:
        return _unknown_region(entry, regions)
    return ""


def _unknown_region(entry: str, regions: Collection[str]) -> str:
    """Return the reason for a region that no provider offers, with known regions to use."""
    if not regions:
        known = "no region is registered yet"
    else:
        listed = sorted(regions)[:MAX_REGIONS_SHOWN]
        more = f" and {len(regions) - len(listed)} more" if len(regions) > len(listed) else ""
        known = f"known regions: {', '.join(listed)}{more}"
    return (
        f"no provider offers region {entry!r} ({known}); name a known region, "
        "which `acsp fleet providers` lists"
    )


def _valid_region_entry(entry: str) -> bool:
    provider, sep, region = entry.partition("/")
    return bool(sep) and bool(TOKEN_PATTERN.match(provider)) and bool(TOKEN_PATTERN.match(region))

"""NATS subjects, JetStream streams and KV buckets that acsp's processes share.

Every subject an agent publishes on carries its provider, region and node, so that the NATS
server can restrict a provider's credentials to its own subjects
(``acsp.*.<provider>.>``). Each token must match :data:`TOKEN_PATTERN`.

Owners declare what they own at start: the scheduler declares ``ACSP_AGENT``,
``ACSP_COMMANDS`` and the heartbeat bucket, metering declares ``ACSP_USAGE`` and the rate-card
bucket, and the grant service and scheduler share ``ACSP_EVENTS``.
"""

from __future__ import annotations

import re
from typing import Final

TOKEN_PATTERN: Final = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")

# JetStream streams.
USAGE_STREAM: Final = "ACSP_USAGE"
"""Usage reports from agents: ``acsp.usage.<provider>.<region>.<node>``."""
AGENT_STREAM: Final = "ACSP_AGENT"
"""Inventory, health events and task events from agents."""
COMMAND_STREAM: Final = "ACSP_COMMANDS"
"""Commands to agents: ``acsp.cmd.<provider>.<region>.<node>``, one durable consumer a node."""
EVENT_STREAM: Final = "ACSP_EVENTS"
"""Facts from services: ``acsp.events.grant.<kind>``, ``acsp.events.job.<kind>`` and
``acsp.events.metering.<kind>``."""

# KV buckets.
HEARTBEAT_BUCKET: Final = "acsp_heartbeat"
"""Latest heartbeat per node, keyed ``<provider>.<region>.<node>``."""
RATE_CARD_BUCKET: Final = "acsp_ratecard"
"""The current rate card, key ``current``, and each version under ``v<version>``."""


def check_token(name: str, value: str) -> str:
    """Return ``value`` if it is a valid subject token, else raise ``ValueError`` naming it."""
    if not TOKEN_PATTERN.match(value):
        raise ValueError(
            f"{name} {value!r} is not a valid identifier: use 1-64 letters, digits, '_' or '-'"
        )
    return value


def node_suffix(provider: str, region: str, node: str) -> str:
    """Return ``<provider>.<region>.<node>`` after validating each token."""
    return ".".join(
        (
            check_token("provider", provider),
            check_token("region", region),
            check_token("node", node),
        )
    )


def usage_subject(provider: str, region: str, node: str) -> str:
    return f"acsp.usage.{node_suffix(provider, region, node)}"


def inventory_subject(provider: str, region: str, node: str) -> str:
    return f"acsp.inventory.{node_suffix(provider, region, node)}"


def health_subject(provider: str, region: str, node: str) -> str:
    return f"acsp.health.{node_suffix(provider, region, node)}"


def task_subject(provider: str, region: str, node: str) -> str:
    """Subject of an agent's task events (started, exited, lost)."""
    return f"acsp.task.{node_suffix(provider, region, node)}"


def heartbeat_key(provider: str, region: str, node: str) -> str:
    return node_suffix(provider, region, node)


def command_subject(provider: str, region: str, node: str) -> str:
    return f"acsp.cmd.{node_suffix(provider, region, node)}"


def command_deliver_subject(provider: str, region: str, node: str) -> str:
    """Subject a node's push consumer delivers its commands to.

    It carries the provider, so the NATS server can let each provider subscribe only to the
    deliveries of its own nodes.
    """
    return f"acsp.deliver.{node_suffix(provider, region, node)}"


def output_subject(provider: str, region: str, node: str) -> str:
    """Subject on which one node's agent receives the scheduler's requests for task output."""
    return f"acsp.output.{node_suffix(provider, region, node)}"


def output_reply_prefix(provider: str, region: str, node: str) -> str:
    """Prefix of the reply subjects of output requests to a node, ending with a dot.

    Agents reply there instead of to an ``_INBOX`` subject, because the NATS server confines
    a provider's publishes to subjects that name the provider, and ignores
    ``allow_responses`` on leaf connections.
    """
    return f"acsp.output_reply.{node_suffix(provider, region, node)}."


def output_reply_subject(provider: str, region: str, node: str, token: str) -> str:
    """Reply subject of one output request to a node; ``token`` keeps requests apart."""
    return output_reply_prefix(provider, region, node) + check_token("token", token)


def grant_event_subject(kind: str) -> str:
    return f"acsp.events.grant.{check_token('kind', kind)}"


def job_event_subject(kind: str) -> str:
    return f"acsp.events.job.{check_token('kind', kind)}"


def metering_event_subject(kind: str) -> str:
    """Subject of a metering fact, such as ``waste_flagged`` for a WasteFlagEvent."""
    return f"acsp.events.metering.{check_token('kind', kind)}"


USAGE_SUBJECTS: Final = ("acsp.usage.>",)
AGENT_SUBJECTS: Final = ("acsp.inventory.>", "acsp.health.>", "acsp.task.>")
COMMAND_SUBJECTS: Final = ("acsp.cmd.>",)
EVENT_SUBJECTS: Final = ("acsp.events.>",)

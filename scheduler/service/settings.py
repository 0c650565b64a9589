"""Settings of the scheduler service, read once from ``ACSP_*`` variables at start."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.runtime.settings import Settings, SettingsError, setting


@dataclass(frozen=True)
class SchedulerSettings(Settings):
    # NOTE: every replica of a shard schedules the whole fleet it hears from; assigning
    # provider groups to shards (and agents' subjects to them) is not implemented yet.
    shard: str = setting(
        "ACSP_SCHEDULER_SHARD", "default", "shard this replica campaigns to lead (one leader each)"
    )
    grant_url: str | None = setting(
        "ACSP_GRANT_ADDRESS", None, "host:port of the grant service that places holds"
    )
    service_token_file: Path | None = setting(
        "ACSP_SCHEDULER_SERVICE_TOKEN_FILE",
        None,
        "file holding the bearer token this service presents to the grant service",
        existing_file=True,
    )
    heartbeat_timeout_s: float = setting(
        "ACSP_SCHEDULER_HEARTBEAT_TIMEOUT_S",
        15.0,
        "seconds without a heartbeat before a node becomes unknown",
        minimum=1.0,
    )
    tick_s: float = setting(
        "ACSP_SCHEDULER_TICK_S",
        1.0,
        "longest interval between scheduling passes, seconds",
        minimum=0.01,
    )
    leader_poll_s: float = setting(
        "ACSP_SCHEDULER_LEADER_POLL_S",
        1.0,
        "seconds between a standby's tries of the leader lock, and between lock checks",
        minimum=0.05,
    )
    half_life_s: float = setting(
        "ACSP_SCHEDULER_FAIR_SHARE_HALF_LIFE_S",
        7 * 86_400.0,
        "half-life of decayed fair-share usage, seconds",
        minimum=1.0,
    )
    max_holds_in_flight: int = setting(
        "ACSP_SCHEDULER_MAX_HOLDS_IN_FLIGHT",
        1024,
        "holds requested from the grant service at once (in PlaceHolds calls of up to 256)",
        minimum=1,
    )
    start_timeout_s: float = setting(
        "ACSP_SCHEDULER_START_TIMEOUT_S",
        120.0,
        "seconds a job may wait for its tasks to start before it is requeued",
        minimum=1.0,
    )
    budget_retry_s: float = setting(
        "ACSP_SCHEDULER_BUDGET_RETRY_S",
        30.0,
        "seconds before the jobs held back by a hold that failed for budget are tried again",
        minimum=0.1,
    )
    outbox_retention_s: float = setting(
        "ACSP_SCHEDULER_OUTBOX_RETENTION_S",
        86_400.0,
        "seconds that commands and job events are kept after JetStream stored them"
        " (commands also until their job ends), for debugging",
        minimum=0.0,
    )
    output_timeout_s: float = setting(
        "ACSP_SCHEDULER_OUTPUT_TIMEOUT_S",
        5.0,
        "seconds ReadTaskOutput waits for the node's agent to return a task's output",
        minimum=0.1,
    )
    max_event_rejections: int = setting(
        "ACSP_SCHEDULER_MAX_EVENT_REJECTIONS",
        5,
        "times JetStream may reject a job event for good (over the stream's max_msg_size, no"
        " stream for its subject) before the event moves to the scheduler.dead_events table",
        minimum=1,
    )

    def validate(self) -> None:
        super().validate()
        if self.grant_url is None:
            raise SettingsError(
                "ACSP_GRANT_ADDRESS",
                "missing",
                "set it to the grant service's host:port; admission places holds there",
            )

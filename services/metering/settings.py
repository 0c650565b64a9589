"""Metering settings: the shared runtime settings plus metering's own ``ACSP_METERING_*``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.metering.charger import ChargerConfig
from services.metering.coverage_sweep import CoverageSweepConfig
from services.metering.ingest import IngestConfig
from services.metering.scheduler_replicas import parse_targets
from services.metering.waste_scan import WasteScanConfig
from services.runtime.settings import Settings, setting


def _parse_scheduler_address(text: str) -> str:
    parse_targets(text)
    return text


@dataclass(frozen=True)
class MeteringSettings(Settings):
    period_s: int = setting(
        "ACSP_METERING_PERIOD_S", 300, "length of a charging period, seconds", minimum=1
    )
    lateness_s: float = setting(
        "ACSP_METERING_LATENESS_S",
        30.0,
        "seconds after a period or an attempt ends before its usage is charged",
        minimum=0.0,
    )
    max_sample_age_s: float = setting(
        "ACSP_METERING_MAX_SAMPLE_AGE_S",
        14 * 86_400.0,
        "seconds before metering receives a sample that the sample may start; an older sample "
        "is a dead letter, and the coverage sweep deletes the overlap check's rows of older "
        "samples",
        # Agents send samples of up to an hour, later after an outage, so an hour would turn
        # the samples of any delay into dead letters.
        minimum=86_400.0,
    )
    coverage_sweep_s: float = setting(
        "ACSP_METERING_COVERAGE_SWEEP_S",
        3600.0,
        "seconds between sweeps that delete the overlap check's rows of samples older than "
        "ACSP_METERING_MAX_SAMPLE_AGE_S",
        minimum=1.0,
    )
    ingest_workers: int = setting(
        "ACSP_METERING_INGEST_WORKERS", 2, "fetch-and-write loops per process", minimum=1
    )
    ingest_batch: int = setting(
        "ACSP_METERING_INGEST_BATCH", 200, "usage messages fetched per batch", minimum=1
    )
    ack_wait_s: float = setting(
        "ACSP_METERING_ACK_WAIT_S", 30.0, "seconds before JetStream redelivers", minimum=1.0
    )
    require_registered_nodes: bool = setting(
        "ACSP_METERING_REQUIRE_REGISTERED_NODES",
        False,
        "reject usage from nodes that no inventory registered (true or false)",
    )
    grant_address: str = setting(
        "ACSP_GRANT_ADDRESS", "127.0.0.1:50051", "host:port of the grant service"
    )
    scheduler_address: str | None = setting(
        "ACSP_SCHEDULER_ADDRESS",
        None,
        "host:port of the scheduler, whose pledges and recalls settlements use; a comma-separated "
        "list, or a host name that resolves to every replica, lets the copy find the leader, "
        "which alone counts each pledge's healthy accelerators",
        parse=_parse_scheduler_address,
    )
    pledge_copy_wait_s: float = setting(
        "ACSP_METERING_PLEDGE_COPY_WAIT_S",
        15.0,
        "seconds a settlement waits for a fresh copy of the provider's pledges from the "
        "scheduler; after that it uses the stored copy only when that copy was made at least "
        "10 minutes after the period ended, and fails otherwise",
        minimum=0.1,
    )
    service_token_file: Path | None = setting(
        "ACSP_METERING_SERVICE_TOKEN_FILE",
        None,
        "file holding the bearer token this service presents to the grant service",
        existing_file=True,
    )
    max_refund_s: float = setting(
        "ACSP_METERING_MAX_REFUND_S",
        21_600.0,
        "most lost time refunded for one fault, seconds",
        minimum=0.0,
    )
    settle_after_s: float = setting(
        "ACSP_METERING_SETTLE_AFTER_S",
        14 * 86_400.0,
        "seconds after an ended job's hold is released before it is settled and takes no "
        "more charges",
        minimum=0.0,
    )
    max_event_rejections: int = setting(
        "ACSP_METERING_MAX_EVENT_REJECTIONS",
        5,
        "times JetStream may reject a waste flag event for good (over the stream's max_msg_size,"
        " no stream for its subject) before the event moves to the metering.dead_events table",
        minimum=1,
    )

    waste_threshold: float = setting(
        "ACSP_METERING_WASTE_THRESHOLD",
        0.1,
        "utilization (0..1) below which a job's accelerators count as idle",
        minimum=0.0,
    )
    waste_sustained_s: float = setting(
        "ACSP_METERING_WASTE_SUSTAINED_S",
        1800.0,
        "seconds of continuous idle use after which a job is flagged as waste",
        minimum=1.0,
    )
    waste_scan_s: float = setting(
        "ACSP_METERING_WASTE_SCAN_S",
        60.0,
        "seconds between background scans that evaluate ended attempts for waste",
        minimum=0.1,
    )

    @property
    def scheduler_addresses(self) -> tuple[str, ...]:
        """The ``host:port`` entries of ACSP_SCHEDULER_ADDRESS, empty when it is not set."""
        return parse_targets(self.scheduler_address) if self.scheduler_address else ()

    def ingest_config(self) -> IngestConfig:
        return IngestConfig(
            workers=self.ingest_workers,
            batch_messages=self.ingest_batch,
            ack_wait_s=self.ack_wait_s,
            period_seconds=self.period_s,
            max_sample_age_s=self.max_sample_age_s,
            require_registered_nodes=self.require_registered_nodes,
        )

    def waste_scan_config(self) -> WasteScanConfig:
        return WasteScanConfig(
            interval_s=self.waste_scan_s,
            lateness_s=self.lateness_s,
            threshold=self.waste_threshold,
            sustained_s=self.waste_sustained_s,
        )

    def coverage_sweep_config(self) -> CoverageSweepConfig:
        return CoverageSweepConfig(
            interval_s=self.coverage_sweep_s, max_sample_age_s=self.max_sample_age_s
        )

    def charger_config(self) -> ChargerConfig:
        return ChargerConfig(
            period_seconds=self.period_s,
            lateness_s=self.lateness_s,
            max_refund_s=self.max_refund_s,
            settle_after_s=self.settle_after_s,
        )

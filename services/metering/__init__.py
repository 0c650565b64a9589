"""Metering: usage samples to PF-day charges, refunds, settlements and efficiency reports.

Start it with ``python -m services.metering``. The modules, by concept:

- ``ratecard``: the versioned catalog and its exact per-second rates (pure).
- ``samples``: decoding and validating UsageReport messages (pure).
- ``ingest`` and ``ingest_store``: the JetStream consumers and the exactly-once COPY write.
- ``charging`` (pure) and ``charge_store``: pricing usage per attempt and period, and the
  outbox that commits charges to the grant ledger.
- ``refunds`` (pure) and ``attempts``: which failures are the provider's fault, hold
  settlement and refund entries.
- ``events``: job, health, task and inventory facts from JetStream.
- ``settlement``, ``pledges``, ``efficiency``, ``queries``: the reports.
- ``servicer``, ``convert``, ``service``, ``settings``: the gRPC edge and the process.
"""

"""The grant service: institutions, projects, applications, review, grants and the ledger.

Run it with ``python -m services.grant``; settings come from ``ACSP_*`` variables
(:mod:`services.grant.settings`). The modules, by concept:

- pure rules, no I/O: :mod:`~services.grant.amounts` (exact PF-day amounts),
  :mod:`~services.grant.ledger_rules` (postings, balances, sub-allocations),
  :mod:`~services.grant.review_rules` (tiers, conflicts of interest, decisions);
- the ledger on PostgreSQL: :mod:`~services.grant.ledger` (batches of holds, charges,
  releases and refunds), :mod:`~services.grant.ledger_reads` and
  :mod:`~services.grant.ledger_writes` (one statement each), :mod:`~services.grant.ledger_batcher`
  (groups concurrent requests), :mod:`~services.grant.budget` (awards, supplements,
  sub-allocations, expiry);
- the program: :mod:`~services.grant.directory` (institutions, projects, members),
  :mod:`~services.grant.applications` (submission and review);
- the edge: :mod:`~services.grant.convert` (protobuf in and out),
  :mod:`~services.grant.access` (who may do what), :mod:`~services.grant.rpc_programs` and
  :mod:`~services.grant.rpc_ledger` (handlers), :mod:`~services.grant.service` (assembly);
- events: :mod:`~services.grant.events` (outbox rows) and :mod:`~services.grant.outbox`
  (publisher), with :mod:`~services.grant.lifecycle` running expiry.
"""

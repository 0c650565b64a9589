"""The federated scheduler.

- :mod:`scheduler.engine`: the placement engine, a pure and deterministic function of fleet
  state, queue and time that returns decisions (place, replace a lost task, preempt, requeue,
  reserve) and the reason every pending job waits. It does no I/O.
- :mod:`scheduler.sim`: a trace replayer that drives the same engine in virtual time
  (``acsp simulate``).
- :mod:`scheduler.service`: the gRPC/NATS service that feeds the engine events, persists its
  decisions and dispatches them to node agents.

docs/engine.md describes the engine's API and policies.
"""

"""Trace replay through the placement engine in virtual time.

:func:`scheduler.sim.runner.simulate` loads a trace (Alibaba openb pod CSV or the Standard
Workload Format) and a fleet, replays them with :class:`scheduler.sim.replay.Replay`, and
writes ``summary.json`` and plots. ``acsp simulate`` is its command line.
"""

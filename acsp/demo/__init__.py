"""``acsp demo``: the whole mesh on a slice of the real openb trace, checked, with a report.

:func:`acsp.demo.runner.run_demo` starts the local mesh with a fleet of three providers, sets
up grants through the grant service, replays trace jobs through the SDK in compressed time,
runs the simulator on the same slice, checks the books and writes the report.
"""

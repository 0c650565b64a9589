"""``acsp demo``: the whole mesh on a slice of the real openb trace, checked, with a report.

:func:`acsp.demo.runner.run_demo` starts the local mesh with a fleet of three providers and
sets up grants through the grant service. It replays trace jobs through the SDK in compressed
time and runs the simulator on the same slice. Then it checks the books and writes the report.
"""

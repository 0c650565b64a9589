"""The node agent: accelerator discovery, health, heartbeats, usage samples and task running.

Run it with ``python -m agents --backend nvml|simulated``. The parts, each in its own module:

- ``backends``: the vendor interface (``base``), NVML, and the simulated fleet;
- ``health``: health rules as a pure state machine;
- ``runner``: task processes, wall time, stop, and finding tasks again after a restart;
- ``spool`` and ``outbox``: write-ahead spool and JetStream publishing;
- ``node`` and ``process``: one node's logic, and the process with its NATS connection.
"""

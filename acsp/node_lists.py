"""Rules that every reader of a node list CSV shares: the agent's simulated fleet files and
the fleet of ``acsp simulate``.

A count of 0 accelerators is a node without accelerators, not an error: the openb full node
list (``openb_node_list_all_node.csv`` of Alibaba's cluster-trace-gpu-v2023) gives its CPU-only
nodes ``gpu`` 0 and no model. Readers skip such nodes, because nothing can be placed on them.
"""

from __future__ import annotations

import re
from typing import Final

_WHOLE_NUMBER: Final = re.compile(r"[+-]?[0-9]+")


def parse_accelerator_count(column: str, text: str) -> int:
    """Parse the accelerator count in ``column`` of a node list row. A count of 0 means a
    node without accelerators.

    Raises ValueError naming the column, the value, the reason and the fix when the value is
    not a whole number or is negative.
    """
    value = text.strip()
    if _WHOLE_NUMBER.fullmatch(value) is None:
        raise ValueError(
            f"{column} {text!r} is not a whole number; give the node's accelerator count, "
            "e.g. 8, or 0 for a node without accelerators"
        )
    count = int(value)
    if count < 0:
        raise ValueError(
            f"{column} {count} is negative; give the node's accelerator count, e.g. 8, or 0 "
            "for a node without accelerators, which is skipped"
        )
    return count

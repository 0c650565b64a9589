"""Network namespaces for a hub, a control plane and provider regions, joined by veth pairs.

The hub namespace has one veth pair to each other namespace, so every region reaches the
control plane only through the hub, as regions do through their leaf nodes in production.
The control namespace has one more pair to the root namespace, so that a test running there
can call the services' gRPC APIs. Deleting a namespace deletes the veth ends inside it, and
with them the pairs.
"""

from __future__ import annotations

import random
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

HUB_NETWORK = "10.231"
"""First two octets of the /30 subnets between the hub and the other namespaces."""


class NamespaceError(RuntimeError):
    """An ``ip`` command failed while building or changing the namespaces."""


def run_ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)


def checked_ip(*args: str) -> None:
    result = run_ip(*args)
    if result.returncode != 0:
        raise NamespaceError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")


@dataclass(frozen=True)
class Link:
    """One veth pair between the hub and another namespace, with the addresses of both ends."""

    hub_device: str
    peer_device: str
    hub_address: str
    peer_address: str


@dataclass
class Topology:
    """The namespaces by role (``hub``, ``control``, region names) and their links to the hub."""

    suffix: str
    namespaces: dict[str, str] = field(default_factory=dict)
    links: dict[str, Link] = field(default_factory=dict)
    root_address: str = ""
    control_address: str = ""

    def namespace(self, role: str) -> str:
        return self.namespaces[role]

    def set_link(self, role: str, up: bool) -> None:
        """Bring the region side of ``role``'s link to the hub down or up again."""
        link = self.links[role]
        checked_ip("-n", self.namespaces[role], "link", "set", link.peer_device, _state(up))


def _state(up: bool) -> str:
    return "up" if up else "down"


def _configure(namespace: str | None, device: str, address: str) -> None:
    prefix = ("-n", namespace) if namespace is not None else ()
    checked_ip(*prefix, "addr", "add", f"{address}/30", "dev", device)
    checked_ip(*prefix, "link", "set", device, "up")


def _add_pair(first: str | None, second: str, names: tuple[str, str]) -> None:
    checked_ip("link", "add", names[0], "type", "veth", "peer", "name", names[1])
    if first is not None:
        checked_ip("link", "set", names[0], "netns", first)
    checked_ip("link", "set", names[1], "netns", second)


@contextmanager
def namespaces(regions: tuple[str, ...]) -> Iterator[Topology]:
    """Create the hub, control and region namespaces and their links, and delete them after.

    Raise :class:`PermissionError` when this process may not create namespaces, before
    anything is created.
    """
    topology = Topology(suffix=uuid.uuid4().hex[:6])
    roles = ("hub", "control", *regions)
    try:
        for role in roles:
            name = f"acsp-{role}-{topology.suffix}"
            created = run_ip("netns", "add", name)
            if created.returncode != 0:
                if not topology.namespaces:
                    raise PermissionError(f"ip netns add failed: {created.stderr.strip()}")
                raise NamespaceError(f"ip netns add {name} failed: {created.stderr.strip()}")
            topology.namespaces[role] = name
            checked_ip("-n", name, "link", "set", "lo", "up")
        hub = topology.namespaces["hub"]
        for index, role in enumerate(("control", *regions)):
            link = Link(
                hub_device=f"h{index}{topology.suffix}",
                peer_device=f"p{index}{topology.suffix}",
                hub_address=f"{HUB_NETWORK}.{90 + index}.1",
                peer_address=f"{HUB_NETWORK}.{90 + index}.2",
            )
            _add_pair(hub, topology.namespaces[role], (link.hub_device, link.peer_device))
            _configure(hub, link.hub_device, link.hub_address)
            _configure(topology.namespaces[role], link.peer_device, link.peer_address)
            topology.links[role] = link
        # The root end is the only address this creates outside the namespaces. A random /30
        # of 10.232.0.0/16 keeps two runs at the same time apart.
        octet = random.randrange(256)
        topology.root_address = f"10.232.{octet}.1"
        topology.control_address = f"10.232.{octet}.2"
        root_device, control_device = f"r{topology.suffix}", f"c{topology.suffix}"
        _add_pair(None, topology.namespaces["control"], (root_device, control_device))
        _configure(None, root_device, topology.root_address)
        _configure(topology.namespaces["control"], control_device, topology.control_address)
        yield topology
    finally:
        for name in topology.namespaces.values():
            run_ip("netns", "del", name)

"""Channels to each replica of the scheduler, so that metering can call the one that leads.

The scheduler runs a leader and standbys per shard. A standby lists pledges from the database
but counts no accelerators, because only the leader keeps the fleet in memory. A channel to a
load-balanced address (a Kubernetes Service) stays on the replica its connection reached, so
it may reach a standby for good. ``ACSP_SCHEDULER_ADDRESS`` therefore names the replicas: a
comma-separated list of ``host:port``, where a host name may resolve to several addresses, such
as a headless Service that names every scheduler pod. Each address gets a channel of its own,
and the caller tries them, starting with the last one that led.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Callable, Sequence
from typing import Any, Final

import grpc

from acsp._channel import RECONNECT_OPTIONS
from services.runtime.channel import open_channel
from services.runtime.settings import Settings
from services.runtime.tls import load_channel_credentials

logger = logging.getLogger(__name__)

RESOLVE_TIMEOUT_S: Final = 5.0
"""Seconds a host name lookup may take before the host is tried under its name alone."""

ChannelFactory = Callable[[str, str], grpc.aio.Channel]
"""A function that opens a channel to an ``ip:port`` address. Its second argument is the host
name that the replica's TLS certificate must contain."""


def replica_channel_factory(settings: Settings, token: str | None) -> ChannelFactory:
    """Return a factory of channels to single scheduler replicas, with this service's identity.

    Unlike other service channels, a call does not wait for an unreachable replica to come back,
    so that the caller moves on to the next replica at once. With TLS, the replica must present
    a certificate for the host name that was resolved, not for its IP address.
    """
    credentials = load_channel_credentials(settings) if settings.tls_enabled else None

    def connect(address: str, host: str) -> grpc.aio.Channel:
        options: list[tuple[str, Any]] = list(RECONNECT_OPTIONS)
        if credentials is not None:
            options.append(("grpc.ssl_target_name_override", host))
        return open_channel(
            address,
            credentials=credentials,
            token=token,
            default_deadline_s=settings.default_deadline_s,
            options=options,
        )

    return connect


def split_host_port(target: str) -> tuple[str, int]:
    """Split ``host:port`` or ``[v6-host]:port``; raise ValueError with the reason."""
    host, separator, port_text = target.rpartition(":")
    if not separator or not host:
        raise ValueError(f"{target!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port_text.isdigit() or not 0 < int(port_text) <= 65535:
        raise ValueError(f"{target!r} has a port that is not a number from 1 to 65535")
    return host, int(port_text)


def parse_targets(text: str) -> tuple[str, ...]:
    """Parse a comma-separated list of ``host:port``; raise ValueError naming a bad entry."""
    targets = tuple(part.strip() for part in text.split(",") if part.strip())
    if not targets:
        raise ValueError("no host:port is given")
    for target in targets:
        split_host_port(target)
    return targets


def _address(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


class SchedulerReplicas:
    """One channel per address of the scheduler's replicas, the last known leader first.

    Not safe for concurrent use: :meth:`replicas` closes the channels of addresses that no
    longer resolve, which another caller may be using.
    """

    def __init__(
        self,
        targets: Sequence[str],
        connect: ChannelFactory,
        resolve_timeout_s: float = RESOLVE_TIMEOUT_S,
    ) -> None:
        self._targets = tuple(targets)
        self._connect = connect
        self._resolve_timeout_s = resolve_timeout_s
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._leader: str | None = None

    @property
    def targets(self) -> tuple[str, ...]:
        return self._targets

    async def replicas(self) -> list[tuple[str, grpc.aio.Channel]]:
        """Resolve the targets and return an (address, channel) pair per replica.

        The replica that led last comes first, and the others follow in the targets' order.
        """
        found: dict[str, str] = {}
        for target in self._targets:
            host, port = split_host_port(target)
            for ip in await self._resolve(host, port):
                found.setdefault(_address(ip, port), host)
        for stale in [address for address in self._channels if address not in found]:
            logger.info("scheduler replica %s is no longer resolved, closing its channel", stale)
            await self._channels.pop(stale).close()
        replicas = []
        for address, host in found.items():
            channel = self._channels.get(address)
            if channel is None:
                channel = self._channels[address] = self._connect(address, host)
            replicas.append((address, channel))
        replicas.sort(key=lambda replica: replica[0] != self._leader)
        return replicas

    def mark_leader(self, address: str) -> bool:
        """Remember ``address`` as the leader; return whether that changed the leader."""
        changed = address != self._leader
        self._leader = address
        return changed

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            await channel.close()

    async def _resolve(self, host: str, port: int) -> list[str]:
        """Return the IP addresses of ``host``, or ``host`` itself when the lookup fails."""
        try:
            ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            return [host]
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._resolve_timeout_s):
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, TimeoutError) as error:
            # gRPC's own resolver then tries the name, and a failed call returns its error.
            logger.warning(
                "could not resolve scheduler host %s, trying it by name: %r", host, error
            )
            return [host]
        ips: list[str] = []
        for _family, _type, _proto, _name, sockaddr in infos:
            ip = str(sockaddr[0])
            if ip not in ips:
                ips.append(ip)
        return ips or [host]

"""Leader election per shard with a PostgreSQL session advisory lock.

The leader holds ``pg_advisory_lock`` on a dedicated connection for as long as it leads; a
standby polls ``pg_try_advisory_lock`` on its own connection. When the leader's process or
connection dies, PostgreSQL frees the lock and the standby takes it. Each new leader bumps
the shard's epoch in ``scheduler.leaders``; the store checks that epoch on every write, so a
deposed leader's writes and dispatches fail with :class:`~scheduler.service.store.Fenced`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Final

import asyncpg

logger = logging.getLogger(__name__)

_LOCK_NAMESPACE: Final = b"acsp.scheduler.shard:"


def lock_key(shard: str) -> int:
    """Return the signed 64-bit advisory lock key of ``shard``."""
    digest = hashlib.sha256(_LOCK_NAMESPACE + shard.encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class LeadershipLost(Exception):
    """The lock connection failed, so this process may no longer be the leader."""


class LeaderLease:
    """Campaign for one shard and watch the lock connection while leading."""

    def __init__(
        self,
        dsn: str,
        shard: str,
        holder: str,
        *,
        poll_interval_s: float = 1.0,
        check_interval_s: float = 1.0,
        timeout_s: float = 5.0,
    ) -> None:
        self._dsn = dsn
        self.shard = shard
        self.holder = holder
        self._poll = poll_interval_s
        self._check = check_interval_s
        self._timeout = timeout_s
        self._conn: asyncpg.Connection | None = None
        self.epoch: int | None = None

    async def acquire(self) -> int:
        """Wait until this process holds the shard's lock; return the new epoch."""
        key = lock_key(self.shard)
        while True:
            conn = await self._connect()
            try:
                while True:
                    got = await conn.fetchval(
                        "SELECT pg_try_advisory_lock($1)", key, timeout=self._timeout
                    )
                    if got:
                        break
                    await asyncio.sleep(self._poll)
                epoch = await self._bump_epoch(conn)
            except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
                logger.warning("leader campaign for shard %s failed, retrying: %s", self.shard, exc)
                await _close_quietly(conn)
                await asyncio.sleep(self._poll)
                continue
            except BaseException:
                await _close_quietly(conn)
                raise
            self._conn = conn
            self.epoch = epoch
            logger.info("became leader of shard %s with epoch %d", self.shard, epoch)
            return epoch

    async def hold(self) -> None:
        """Return only when leadership is lost, raising :class:`LeadershipLost`.

        A query on the lock connection every ``check_interval_s`` proves the session, and so
        the lock, is alive. The check also confirms that no other process bumped the epoch.
        """
        conn = self._conn
        if conn is None:
            raise RuntimeError("hold() called before acquire()")
        while True:
            await asyncio.sleep(self._check)
            try:
                current = await conn.fetchval(
                    "SELECT epoch FROM scheduler.leaders WHERE shard = $1",
                    self.shard,
                    timeout=self._timeout,
                )
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                raise LeadershipLost(
                    f"lock connection of shard {self.shard} failed: {exc}"
                ) from exc
            if current != self.epoch:
                raise LeadershipLost(
                    f"shard {self.shard} epoch moved from {self.epoch} to {current}"
                )

    async def release(self) -> None:
        """Close the lock connection, which frees the lock for a standby."""
        conn, self._conn = self._conn, None
        if conn is not None:
            await asyncio.shield(_close_quietly(conn))
            logger.info("released leadership of shard %s", self.shard)

    async def _connect(self) -> asyncpg.Connection:
        while True:
            try:
                return await asyncpg.connect(self._dsn, timeout=self._timeout)
            except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
                logger.warning("cannot connect for leader election: %s", exc)
                await asyncio.sleep(self._poll)

    async def _bump_epoch(self, conn: asyncpg.Connection) -> int:
        # The UPDATE waits for every in-flight fenced write (they hold FOR SHARE on this row).
        epoch: int = await conn.fetchval(
            "INSERT INTO scheduler.leaders (shard, epoch, holder) VALUES ($1, 1, $2)"
            " ON CONFLICT (shard) DO UPDATE SET epoch = scheduler.leaders.epoch + 1,"
            " holder = EXCLUDED.holder, since = now() RETURNING epoch",
            self.shard,
            self.holder,
            timeout=self._timeout,
        )
        return epoch


async def _close_quietly(conn: asyncpg.Connection) -> None:
    try:
        await asyncio.wait_for(conn.close(), timeout=2.0)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
        logger.debug("closing the lock connection failed, terminating it: %s", exc)
        conn.terminate()

"""NATS for acsp services: connect with bounded waits, declare streams and buckets.

::

    client = await connect_nats(settings, "metering")      # reconnects forever after this
    js = client.jetstream()
    await ensure_stream(js, StreamConfig(name=USAGE_STREAM, subjects=list(USAGE_SUBJECTS)))
    await ensure_key_value(js, KeyValueConfig(bucket=RATE_CARD_BUCKET, history=16))

Publishing with many acks in flight and consuming with acks after commit live in
:mod:`services.runtime.jetstream`; this module re-exports them so that
``from services.runtime.nats import Publisher, PullConsumer`` keeps working.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
from typing import Any, Final

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client, ErrorCallback, Server
from nats.js.api import KeyValueConfig, StreamConfig, StreamInfo
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from services.runtime.jetstream import MSG_ID_HEADER, BatchHandler, Publisher, PullConsumer, Reject
from services.runtime.publish_errors import PublishViolations
from services.runtime.settings import Settings, SettingsError, redact_url
from services.runtime.tls import load_nats_ssl_context

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S: Final = 10.0
RECONNECT_WAIT_S: Final = 2
RECONNECT_BASE_S: Final = 0.25
RECONNECT_MAX_WAIT_S: Final = 10.0
DRAIN_TIMEOUT_S: Final = 10

__all__ = [
    "CONNECT_TIMEOUT_S",
    "MSG_ID_HEADER",
    "BatchHandler",
    "Publisher",
    "PullConsumer",
    "Reject",
    "TlsCheckingClient",
    "TlsRequiredError",
    "close_nats",
    "connect_nats",
    "ensure_key_value",
    "ensure_stream",
]


class TlsRequiredError(nats.errors.Error):
    """A NATS server did not offer TLS, but the settings require it; nothing was sent to it."""


class TlsCheckingClient(Client):
    """A Client that rejects a plaintext server before sending CONNECT, when TLS is required.

    :func:`connect_nats` uses it. A process with a connect loop of its own creates it with
    ``require_tls=ssl_context is not None`` and passes ``tls=ssl_context`` to ``connect``,
    where ``ssl_context`` comes from :func:`services.runtime.tls.load_nats_ssl_context`.

    NOTE: nats-py (2.16) upgrades to TLS only when the server's INFO sets ``tls_required``,
    even for a tls:// URL, so a plaintext server or a man in the middle that clears the flag
    would receive the credentials in clear. A server that makes TLS optional
    (``allow_non_tls``) is rejected too, because nats-py does not upgrade on ``tls_available``.
    This overrides the private ``_process_info``, and ``tests/runtime/test_nats_tls.py`` fails
    if a nats-py release stops calling it.

    It also records the publish permissions violations that the server reports, before the
    error callback given to ``connect`` receives them, so that publishers can reject a message
    whose user may not publish it (see :func:`services.runtime.publish_errors.reject_unpermitted`).
    """

    def __init__(self, require_tls: bool) -> None:
        super().__init__()
        self._require_tls = require_tls
        self.publish_violations = PublishViolations()

    async def connect(self, **options: Any) -> None:  # type: ignore[override]
        """Connect as ``Client.connect`` does, recording violations before ``error_cb`` runs."""
        report: ErrorCallback = options.get("error_cb") or _log_error

        async def record_then_report(error: Exception) -> None:
            self.publish_violations.record(error)
            await report(error)

        await super().connect(**{**options, "error_cb": record_then_report})

    async def _process_info(self, info: dict[str, Any], initial_connection: bool = False) -> None:
        server = self._current_server
        # A wss:// connection is TLS from its first byte, regardless of the INFO flags.
        secure_transport = server is not None and server.uri.scheme == "wss"
        if (
            initial_connection
            and self._require_tls
            and not secure_transport
            and not info.get("tls_required", False)
        ):
            where = f"{server.uri.hostname}:{server.uri.port}" if server else "the server"
            raise TlsRequiredError(
                f"{where} does not offer TLS, but ACSP_NATS_URL uses tls:// or ACSP_NATS_TLS_* "
                "is set; credentials were not sent"
            )
        await super()._process_info(info, initial_connection)


async def connect_nats(settings: Settings, name: str, *, inbox_prefix: str | None = None) -> Client:
    """Connect to ``ACSP_NATS_URL`` within CONNECT_TIMEOUT_S; raise SettingsError if it fails.

    The first connection retries every RECONNECT_WAIT_S seconds until CONNECT_TIMEOUT_S. After
    it, the client reconnects forever with jittered exponential backoff (RECONNECT_BASE_S
    doubling up to RECONNECT_MAX_WAIT_S) and buffers publishes meanwhile.

    With TLS required (see :func:`services.runtime.tls.load_nats_ssl_context`), every
    connection and reconnection to a server that does not offer TLS fails. ``inbox_prefix``
    replaces ``_INBOX`` in reply subjects (request replies, JetStream publish acks), for users
    whose permissions allow only their own inboxes, such as ``_INBOX.<provider>``.
    """
    url: str = settings.require("nats_url")
    if inbox_prefix is not None:
        _check_inbox_prefix(inbox_prefix)
    ssl_context = load_nats_ssl_context(settings)
    # The first connection retries until the timeout, which would hide the real cause (an
    # authorization violation, say). Until connected, the error callback keeps the latest one
    # for the startup message instead of logging each retry. The client's status cannot tell
    # the two apart, because a reconnect attempt is CONNECTING while it reads the server's INFO.
    errors: list[Exception] = []
    first_connection = asyncio.Event()
    client = TlsCheckingClient(require_tls=ssl_context is not None)

    async def remember_error(error: Exception) -> None:
        if first_connection.is_set():
            await _log_error(error)
        elif not errors or not isinstance(error, OSError) or isinstance(errors[0], OSError):
            # A socket error never hides the error the server sent on an earlier attempt: a server
            # that refuses the credentials may reset the connection before its -ERR is read.
            errors[:] = [error]

    options: dict[str, Any] = {
        "servers": [part.strip() for part in url.split(",")],
        "name": f"acsp-{name}",
        "connect_timeout": 2,
        "reconnect_time_wait": RECONNECT_WAIT_S,
        "max_reconnect_attempts": -1,
        "drain_timeout": DRAIN_TIMEOUT_S,
        "error_cb": remember_error,
        "disconnected_cb": _log_disconnected,
        "reconnected_cb": _log_reconnected,
        "reconnect_to_server_handler": _reconnect_backoff,
    }
    if settings.nats_user is not None:
        options["user"] = settings.nats_user
        options["password"] = settings.nats_password
    if settings.nats_creds is not None:
        options["user_credentials"] = str(settings.nats_creds)
    if ssl_context is not None:
        options["tls"] = ssl_context
    if inbox_prefix is not None:
        options["inbox_prefix"] = inbox_prefix
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            await client.connect(**options)
    except (OSError, TimeoutError, nats.errors.Error) as error:
        await _close_quietly(client)
        cause = errors[0] if errors else error
        reason = str(cause) or type(cause).__name__
        shown = ",".join(redact_url(part.strip()) for part in url.split(","))
        raise SettingsError(
            "ACSP_NATS_URL",
            f"cannot connect to {shown} within {CONNECT_TIMEOUT_S:.0f} s: {reason}",
            "start nats-server with JetStream there, or check ACSP_NATS_USER/PASSWORD/CREDS "
            "and ACSP_NATS_TLS_*",
        ) from None
    first_connection.set()
    server = client.connected_url
    log.info(
        "connected to NATS",
        extra={
            "server": f"{server.hostname}:{server.port}" if server else "unknown",
            "tls": ssl_context is not None,
        },
    )
    return client


def _check_inbox_prefix(prefix: str) -> None:
    # The client appends ".<unique id>" and subscribes to "<prefix>.<id>.*", so the prefix
    # must be a plain subject: dot-separated, non-empty tokens without wildcards or spaces.
    tokens = prefix.split(".")
    if any(not token or token in ("*", ">") or any(c.isspace() for c in token) for token in tokens):
        raise ValueError(
            f"inbox_prefix {prefix!r} is not a plain NATS subject; pass e.g. '_INBOX.<provider>'"
        )


async def close_nats(client: Client, timeout_s: float = DRAIN_TIMEOUT_S) -> None:
    """Drain subscriptions and pending publishes, then close, within ``timeout_s``."""
    if client.is_closed:
        return
    try:
        async with asyncio.timeout(timeout_s):
            await client.drain()
    except (TimeoutError, nats.errors.Error) as error:
        log.warning("NATS drain did not finish: %s; closing", error)
        await _close_quietly(client)
    log.info("NATS connection closed")


async def _close_quietly(client: Client) -> None:
    with contextlib.suppress(nats.errors.Error, OSError):
        await client.close()


def _reconnect_backoff(
    servers: list[Server], server_info: dict[str, Any]
) -> tuple[Server | None, float]:
    # Try the server with the fewest failed attempts; the delay doubles with its failures.
    server = min(servers, key=lambda candidate: candidate.reconnects)
    delay = min(RECONNECT_MAX_WAIT_S, RECONNECT_BASE_S * 2**server.reconnects)
    return server, delay * random.uniform(0.5, 1.0)


async def _log_error(error: Exception) -> None:
    log.warning("NATS error: %s", error)


async def _log_disconnected() -> None:
    log.warning("disconnected from NATS; reconnecting")


async def _log_reconnected() -> None:
    log.info("reconnected to NATS")


# Declarations.


async def ensure_stream(js: JetStreamContext, config: StreamConfig) -> StreamInfo:
    """Create the stream, or update it if a field set in ``config`` differs on the server.

    Fields left at their StreamConfig default are not compared, because the server fills in
    its own (a 0 ``duplicate_window`` becomes 2 minutes), so setting a field back to its
    default needs an explicit non-default value or a manual update.
    """
    assert config.name is not None
    try:
        info = await js.stream_info(config.name)
    except nats.js.errors.NotFoundError:
        log.info("creating stream", extra={"stream": config.name})
        return await js.add_stream(config)
    changed = _changed_fields(config, info.config)
    if not changed:
        return info
    log.info("updating stream", extra={"stream": config.name, "fields": ",".join(changed)})
    merged = dataclasses.replace(info.config, **{name: getattr(config, name) for name in changed})
    return await js.update_stream(merged)


async def ensure_key_value(js: JetStreamContext, config: KeyValueConfig) -> KeyValue:
    """Create the bucket, or update its history, TTL and limits if they differ."""
    try:
        bucket = await js.key_value(config.bucket)
    except nats.js.errors.BucketNotFoundError:
        log.info("creating key-value bucket", extra={"bucket": config.bucket})
        return await js.create_key_value(config)
    stream_name = f"KV_{config.bucket}"
    info = await js.stream_info(stream_name)
    wanted: dict[str, Any] = {
        "max_msgs_per_subject": config.history,
        "max_age": config.ttl,
        "max_bytes": config.max_bytes,
        "max_msg_size": config.max_value_size,
        "num_replicas": config.replicas,
        "description": config.description,
    }
    changed = {
        name: value
        for name, value in wanted.items()
        if value is not None and _normalized(getattr(info.config, name)) != _normalized(value)
    }
    if changed:
        log.info(
            "updating key-value bucket",
            extra={"bucket": config.bucket, "fields": ",".join(changed)},
        )
        await js.update_stream(dataclasses.replace(info.config, **changed))
        bucket = await js.key_value(config.bucket)
    return bucket


def _changed_fields(wanted: Any, current: Any) -> list[str]:
    changed = []
    for spec in dataclasses.fields(wanted):
        value = getattr(wanted, spec.name)
        if value is None or value == spec.default:
            continue
        if _normalized(value) != _normalized(getattr(current, spec.name, None)):
            changed.append(spec.name)
    return changed


def _normalized(value: Any) -> Any:
    # The server echoes subject lists in its own order and durations as floats.
    if isinstance(value, list):
        return sorted(map(str, value))
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return value

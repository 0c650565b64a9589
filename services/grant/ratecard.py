"""The version of the current rate card, which a fixed-rate grant keeps for its whole life."""

from __future__ import annotations

import asyncio
import logging

import nats.errors
import nats.js.errors
from nats.js.client import JetStreamContext

from acsp.subjects import RATE_CARD_BUCKET
from acsp.v1 import metering_pb2

log = logging.getLogger(__name__)


async def current_version(js: JetStreamContext | None, timeout_s: float = 2.0) -> int | None:
    """Return the version metering published under ``current``, or None if there is none.

    Metering writes the current card to the KV bucket. Without NATS, or before metering has
    published a card, the grant records no version and metering prices it at the current card.
    """
    if js is None:
        return None
    try:
        async with asyncio.timeout(timeout_s):
            bucket = await js.key_value(RATE_CARD_BUCKET)
            entry = await bucket.get("current")
    except (nats.js.errors.BucketNotFoundError, nats.js.errors.KeyNotFoundError):
        log.warning(
            "no current rate card in bucket %s; the award fixes no version", RATE_CARD_BUCKET
        )
        return None
    except (TimeoutError, nats.errors.Error) as error:
        log.warning("reading the current rate card failed: %s; the award fixes no version", error)
        return None
    if entry.value is None:
        return None
    version = metering_pb2.RateCard.FromString(entry.value).version
    return version or None

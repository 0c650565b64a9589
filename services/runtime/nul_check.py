"""Rejection of requests whose text contains a NUL character.

PostgreSQL's ``text`` cannot store U+0000, and no id, name, command or environment value may
contain one. A request with a NUL anywhere would otherwise fail in the database as an internal
error, or, where writes are batched across callers, fail the other callers' writes too. So the
server rejects it before any handler runs, naming the field.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from services.runtime.errors import InvalidArgument


def find_nul_field(message: Message, prefix: str = "") -> str | None:
    """Return the path of the first string field of ``message`` that contains U+0000, or None.

    Nested messages, repeated fields and map keys and values are searched. A path reads like
    ``spec.command[1]`` or ``spec.environment['KEY']``.
    """
    for field, value in message.ListFields():
        path = f"{prefix}{field.name}"
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            found = _find_in_map(field, value, path)
        elif field.is_repeated:
            found = _find_in_items(field, value, path)
        else:
            found = _find_in_value(field, value, path)
        if found is not None:
            return found
    return None


def _find_in_map(field: FieldDescriptor, entries: Any, path: str) -> str | None:
    entry_type = field.message_type
    assert entry_type is not None  # a map field's entries are messages
    value_field = entry_type.fields_by_name["value"]
    for key, value in entries.items():
        if isinstance(key, str) and "\x00" in key:
            return f"{path} key {key!r}"
        found = _find_in_value(value_field, value, f"{path}[{key!r}]")
        if found is not None:
            return found
    return None


def _find_in_items(field: FieldDescriptor, items: Any, path: str) -> str | None:
    for index, item in enumerate(items):
        found = _find_in_value(field, item, f"{path}[{index}]")
        if found is not None:
            return found
    return None


def _find_in_value(field: FieldDescriptor, value: Any, path: str) -> str | None:
    if field.type == FieldDescriptor.TYPE_STRING:
        return path if "\x00" in value else None
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return find_nul_field(value, f"{path}.")
    return None


class NulCharacterInterceptor(grpc.aio.ServerInterceptor):
    """Reject a unary request with a NUL character in any string field as INVALID_ARGUMENT.

    It must run inside :class:`~services.runtime.interceptors.ErrorInterceptor`, which turns
    the raised InvalidArgument into the call's status.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming:
            return handler
        if handler.response_streaming:
            stream_behavior = handler.unary_stream

            async def checked_stream(request: Any, servicer_context: Any) -> AsyncIterator[Any]:
                _reject_nul(request)
                result = stream_behavior(request, servicer_context)
                if hasattr(result, "__aiter__"):
                    async for response in result:
                        yield response
                else:
                    # A handler that writes with ``context.write`` returns a coroutine.
                    await result

            return handler._replace(unary_stream=checked_stream)
        unary_behavior = handler.unary_unary

        async def checked_unary(request: Any, servicer_context: Any) -> Any:
            _reject_nul(request)
            return await unary_behavior(request, servicer_context)

        return handler._replace(unary_unary=checked_unary)


def _reject_nul(request: Any) -> None:
    if not isinstance(request, Message):
        return
    field = find_nul_field(request)
    if field is not None:
        raise InvalidArgument(
            field,
            "contains a NUL character (U+0000)",
            "remove it, because no text field may contain one",
        )

"""Every request is checked before a handler sees it, and nothing answers UNKNOWN.

gRPC's asyncio server turns an exception in a request deserializer (undecodable bytes) or an
unexpected exception in a handler into UNKNOWN, and its receive limit is one number for the
whole server. `RequestGuard`, a server interceptor, wraps every method's handler once:

- its request deserializer never raises: it checks the method's size limit
  (server/limits.py), parses, and checks every enum value and string length of the message,
  recursively; a request that fails becomes a `Refusal` that the handler wrapper answers with
  INVALID_ARGUMENT (undecodable, unknown enum value, string too long) or RESOURCE_EXHAUSTED
  (over the method's size limit), before any handler code runs;
- a client stream that sends nothing for `idle_timeout_s`, or that averages less than
  `limits.min_upload_bytes_per_s` once it is older than that, ends with DEADLINE_EXCEEDED,
  which frees whatever the handler held (an upload slot); one the handler is done with is read to
  its end (bounded), so that gRPC frees the call at once (`_read_to_end`);
- a CoordinatorError escaping a handler becomes its status (server.errors); any other
  exception is logged with its traceback and answered UNAVAILABLE: an internal or store
  failure, which the device retries later.

The open services (health, reflection: server/health.py) pass unguarded: their handlers come
from grpcio's own packages, answer with their own statuses, and stream by `context.write`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf import descriptor, message

from server import limits
from server.errors import (
    CoordinatorError,
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    answer_unexpected,
    refuse,
)
from server.method_wrapping import WrappingInterceptor

log = logging.getLogger(__name__)

Deserializer = Callable[[bytes], Any]


@dataclasses.dataclass(frozen=True)
class Refusal:
    """What a guarded deserializer returns instead of a request it refuses. The error is
    never raised itself (a raised error would hold, through its traceback, the frame that
    holds this refusal: a reference cycle that keeps the call alive; see server/errors.py)."""

    error: CoordinatorError

    def raised(self) -> CoordinatorError:
        return type(self.error)(*self.error.args)


def check_fields(request: message.Message) -> None:
    """Raises InvalidArgument for an enum value its type does not define, or a string over
    its limit (server/limits.py), anywhere in the message."""
    for field, value in request.ListFields():
        repeated = field.label == descriptor.FieldDescriptor.LABEL_REPEATED  # type: ignore[attr-defined]
        values = value if repeated else (value,)
        match field.type:
            case descriptor.FieldDescriptor.TYPE_ENUM:
                assert field.enum_type is not None
                for number in values:
                    if number not in field.enum_type.values_by_number:
                        raise InvalidArgument(
                            f"{field.full_name}: {number} is not a {field.enum_type.name}"
                        )
            case descriptor.FieldDescriptor.TYPE_STRING:
                limit = limits.max_string_bytes_by_field.get(
                    field.full_name, limits.max_string_bytes
                )
                for text in values:
                    if len(text) > limit or len(text.encode()) > limit:
                        raise InvalidArgument(
                            f"{field.full_name} is longer than its limit of {limit} bytes"
                        )
            case descriptor.FieldDescriptor.TYPE_MESSAGE:
                assert field.message_type is not None
                if field.message_type.GetOptions().map_entry:
                    continue  # no request has a map; responses (metrics) are ours
                for item in values:
                    check_fields(item)
            case _:
                pass


def guarded_deserializer(method: str, deserializer: Deserializer | None) -> Deserializer:
    max_bytes = limits.max_request_bytes_by_method.get(method, limits.default_max_request_bytes)

    def deserialize(raw: bytes) -> Any:
        if len(raw) > max_bytes:
            return Refusal(
                ResourceExhausted(
                    f"a {method.rsplit('/', 1)[-1]} request is at most {max_bytes} bytes, "
                    f"got {len(raw)}"
                )
            )
        try:
            request = deserializer(raw) if deserializer is not None else raw
            if isinstance(request, message.Message):
                check_fields(request)
        except CoordinatorError as exc:
            return Refusal(exc.with_traceback(None))
        except Exception as exc:  # protobuf's DecodeError, or whatever a parser raises
            return Refusal(InvalidArgument(f"undecodable request: {exc}"))
        return request

    return deserialize


def _wire_size(request: Any) -> int:
    """Bytes a stream message took on the wire (uploads arrive undecoded, as a memoryview)."""
    if isinstance(request, bytes | memoryview):
        return len(request)
    return int(request.ByteSize())


class RequestGuard(WrappingInterceptor):
    def __init__(self, idle_timeout_s: float = limits.upload_idle_timeout_s) -> None:
        super().__init__()
        self.idle_timeout_s = idle_timeout_s

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        deserialize = guarded_deserializer(method, handler.request_deserializer)
        serialize = handler.response_serializer
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, handler.unary_unary), deserialize, serialize
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._unary_stream(method, handler.unary_stream), deserialize, serialize
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._stream_unary(method, handler.stream_unary), deserialize, serialize
            )
        return handler  # no bidirectional streams in Overnight's protocol

    async def _read_to_end(self, requests: AsyncIterator[Any]) -> None:
        """Reads what a client still sends on a stream the handler is done with (at most
        `max_drained_messages`, none once it goes idle).

        grpcio's asyncio server keeps a client stream's reader in a reference cycle with the
        call until the reader is exhausted: a call whose stream was not read to its end stays
        alive, and counted against the connection's grpc.max_concurrent_streams, until
        Python's cyclic garbage collector runs. After 64 refused uploads every later call on
        that connection was refused ("RST_STREAM with error code 7"). Read to the end, the
        call is freed at once, and the device gets the status after it has sent everything
        (an asyncio client that is still writing can see INTERNAL instead, grpc#36066).
        """
        iterator = aiter(requests)
        try:
            for _ in range(limits.max_drained_messages):
                async with asyncio.timeout(self.idle_timeout_s):
                    await anext(iterator)
        except (StopAsyncIteration, TimeoutError):
            pass
        except Exception as exc:  # the rest of a refused stream changes nothing
            log.debug("reading a finished stream to its end stopped: %s", exc)

    def _unary(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                if isinstance(request, Refusal):
                    refuse(method, request.error, context)
                    return None
                return await behavior(request, context)
            except CoordinatorError as exc:
                refuse(method, exc, context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                answer_unexpected(method, exc, context)

        return guarded

    def _unary_stream(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                if isinstance(request, Refusal):
                    refuse(method, request.error, context)
                    return
                async for response in behavior(request, context):
                    yield response
            except CoordinatorError as exc:
                refuse(method, exc, context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                answer_unexpected(method, exc, context)

        return guarded

    def _stream_unary(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        idle_timeout_s = self.idle_timeout_s
        min_rate = limits.min_upload_bytes_per_s

        async def checked(
            requests: AsyncIterator[Any], went_idle: list[bool]
        ) -> AsyncGenerator[Any, None]:
            iterator = aiter(requests)
            loop = asyncio.get_running_loop()
            started, received = loop.time(), 0
            while True:
                try:
                    # asyncio.timeout, not wait_for: wait_for reads in a task of its own, whose
                    # stored StopAsyncIteration ties the call into a reference cycle.
                    async with asyncio.timeout(idle_timeout_s):
                        request = await anext(iterator)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    went_idle.append(True)
                    raise DeadlineExceeded(
                        f"the stream sent nothing for {idle_timeout_s:g} s; it was cancelled"
                    ) from None
                if isinstance(request, Refusal):
                    raise request.raised()
                received += _wire_size(request)
                elapsed = loop.time() - started
                if elapsed > idle_timeout_s and received < min_rate * elapsed:
                    raise DeadlineExceeded(
                        f"the stream averaged {received / elapsed:.0f} bytes/s, under the "
                        f"coordinator's minimum of {min_rate:g}; it was cancelled"
                    )
                yield request

        async def guarded(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            went_idle: list[bool] = []  # set when the client stopped sending
            stream = checked(requests, went_idle)
            try:
                return await behavior(stream, context)
            except CoordinatorError as exc:
                refuse(method, exc, context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                answer_unexpected(method, exc, context)
            finally:
                await stream.aclose()
                if not went_idle:
                    await self._read_to_end(requests)
            return None

        return guarded

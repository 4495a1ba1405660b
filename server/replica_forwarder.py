"""How one replica forwards a device's call to another (server/replica_forwarding.py says
which calls): the channels, the assertion a forwarded call carries, and the relay of the
host's answer.

- The request goes on unchanged, so the host checks the device's signature, token and
  session credentials itself. The forwarder adds one assertion, the device's peer address
  (the host's per-network flood limits and network share need it), bound to the method and a
  time, and authenticated with an HMAC-SHA256 under the cluster's forwarding secret (kept in
  PostgreSQL, server/secure_routes.py). A call that carries the assertion with a MAC that
  does not verify, a stale one or one for another method is refused UNAUTHENTICATED.
- The device sees the host's answer: its response, or its status code, details and
  `retry-after-s`. A host that cannot be reached is UNAVAILABLE (the device's retry policy
  tries another replica); a host status of UNKNOWN (never sent by a coordinator) is passed
  on as UNAVAILABLE.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar, cast

import grpc
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, hmac
from google.protobuf import message

from device_runtime import constants as protocol
from device_runtime.channel import keepalive_options
from device_runtime.transport import channel_options
from server.errors import Unauthenticated
from server.grpc_service import DEVICE_SERVICE, SECAGG_SERVICE

log = logging.getLogger(__name__)
T = TypeVar("T")
Request = TypeVar("Request", bound=message.Message)

forwarded_metadata = "overnight-forwarded"  # "<device peer>|<issued at, s>|<method>"
forwarded_mac_metadata = "overnight-forwarded-mac"  # hex HMAC-SHA256 of the above
# How old an assertion may be when the host reads it (replicas' clocks may differ a little).
forwarded_freshness_s = 60.0
# A forwarded call without the device's own deadline gets this one; a long poll gets the
# host's poll time and this margin, so the host's DEADLINE_EXCEEDED ("poll again") arrives.
forwarded_timeout_s = protocol.rpc_timeout_s
forwarded_poll_margin_s = 10.0
# Connections a replica opens to each other replica it forwards to (see Forwarder._channel).
connections_per_replica = 8

CHECK_IN = f"/{DEVICE_SERVICE}/CheckIn"
UPLOAD_UPDATE = f"/{DEVICE_SERVICE}/UploadUpdate"
REPORT_FAILURE = f"/{DEVICE_SERVICE}/ReportFailure"
SECAGG_SEND = f"/{SECAGG_SERVICE}/Send"
SECAGG_SEND_MASKED_INPUT = f"/{SECAGG_SERVICE}/SendMaskedInput"
SECAGG_AWAIT = f"/{SECAGG_SERVICE}/AwaitServerMessage"


class Forwarder:
    """Channels to the other replicas, and the assertion forwarded calls carry."""

    def __init__(
        self,
        secret: bytes,
        credentials: grpc.ChannelCredentials | None,
        server_name: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`credentials` None: plaintext (`--insecure`). `server_name`: the name the replicas'
        certificates carry when it is not the host in their addresses."""
        self._secret = secret
        self._credentials = credentials
        self._server_name = server_name
        self._clock = clock
        self._channels: dict[str, list[grpc.aio.Channel]] = {}
        self._turn = 0
        self.forwarded = 0  # calls relayed to a host

    # ----- the assertion ----------------------------------------------------------------

    def _mac(self, assertion: str) -> hmac.HMAC:
        mac = hmac.HMAC(self._secret, hashes.SHA256())
        mac.update(assertion.encode())
        return mac

    def metadata(self, peer: str, method: str) -> tuple[tuple[str, str], ...]:
        assertion = f"{peer}|{self._clock():.3f}|{method}"
        return (
            (forwarded_metadata, assertion),
            (forwarded_mac_metadata, self._mac(assertion).finalize().hex()),
        )

    def asserted_peer(self, context: grpc.aio.ServicerContext, method: str) -> str | None:
        """The device's peer address a forwarding replica asserts for this call; None for a
        call straight from a device. Raises Unauthenticated for an assertion that does not
        verify, names another method or is stale."""
        metadata = dict(context.invocation_metadata() or ())
        assertion = metadata.get(forwarded_metadata)
        if assertion is None:
            return None
        try:
            self._mac(str(assertion)).verify(bytes.fromhex(str(metadata[forwarded_mac_metadata])))
            peer, issued_at, called = str(assertion).rsplit("|", 2)
            fresh = abs(self._clock() - float(issued_at)) <= forwarded_freshness_s
        except (KeyError, ValueError, InvalidSignature):
            raise Unauthenticated("a forwarded call's assertion does not verify") from None
        if called != method or not fresh:
            raise Unauthenticated("a forwarded call's assertion is for another call or stale")
        return peer

    # ----- relaying ---------------------------------------------------------------------

    def _channel(self, address: str) -> grpc.aio.Channel:
        """One of `connections_per_replica` channels to `address`, in turn. Each has its own
        connection: a host allows `limits.max_concurrent_streams_per_connection` calls on
        one, and a secure round's devices long-poll through the forwarder all at once."""
        pool = self._channels.setdefault(address, [])
        self._turn += 1
        if len(pool) < connections_per_replica:
            options: list[tuple[str, Any]] = [
                *channel_options(),  # message sizes, as devices' channels
                # A subchannel (connection) of this channel's own, not one shared with the
                # pool's other channels.
                ("grpc.use_local_subchannel_pool", 1),
                # Pings while a call is in flight, as devices send them: a hung host fails the
                # forwarded call UNAVAILABLE before the device's deadline (docs/scaling.md).
                *keepalive_options(),
            ]
            if self._credentials is None:
                pool.append(grpc.aio.insecure_channel(address, options=options))
            else:
                if self._server_name:
                    options.append(("grpc.ssl_target_name_override", self._server_name))
                pool.append(grpc.aio.secure_channel(address, self._credentials, options=options))
            return pool[-1]
        return pool[self._turn % len(pool)]

    @staticmethod
    def _timeout(context: grpc.aio.ServicerContext, default_s: float) -> float:
        remaining = context.time_remaining()
        return default_s if remaining is None else max(0.0, remaining)

    async def unary(
        self,
        address: str,
        method: str,
        request: Request,
        response_type: type[T],
        context: grpc.aio.ServicerContext,
        timeout_s: float = forwarded_timeout_s,
    ) -> T:
        call = self._channel(address).unary_unary(
            method,
            request_serializer=type(request).SerializeToString,
            response_deserializer=response_type.FromString,  # type: ignore[attr-defined]
        )
        self.forwarded += 1
        try:
            return cast(
                T,
                await call(
                    request,
                    metadata=self.metadata(context.peer(), method),
                    timeout=self._timeout(context, timeout_s),
                ),
            )
        except grpc.aio.AioRpcError as exc:
            return _relay_status(method, address, exc, context)

    async def stream(
        self,
        address: str,
        method: str,
        requests: AsyncIterator[Any],
        serializer: Callable[[Any], bytes],
        response_type: type[T],
        context: grpc.aio.ServicerContext,
    ) -> T:
        call = self._channel(address).stream_unary(
            method,
            request_serializer=serializer,
            response_deserializer=response_type.FromString,  # type: ignore[attr-defined]
        )
        self.forwarded += 1
        try:
            return cast(
                T,
                await call(
                    requests,
                    metadata=self.metadata(context.peer(), method),
                    timeout=self._timeout(context, forwarded_timeout_s),
                ),
            )
        except grpc.aio.AioRpcError as exc:
            return _relay_status(method, address, exc, context)

    async def close(self) -> None:
        for pool in self._channels.values():
            for channel in pool:
                await channel.close()
        self._channels.clear()


def _relay_status(
    method: str, address: str, exc: grpc.aio.AioRpcError, context: grpc.aio.ServicerContext
) -> Any:
    """Ends the device's call with the host's status (see the module's docstring)."""
    code = exc.code()
    if code is grpc.StatusCode.UNKNOWN:
        code = grpc.StatusCode.UNAVAILABLE
    retry = [
        (key, value)
        for key, value in (exc.trailing_metadata() or ())
        if key == protocol.retry_after_metadata
    ]
    if retry:
        context.set_trailing_metadata(tuple(retry))
    log.info("%s forwarded to %s: %s %s", method, address, code.name, exc.details())
    context.set_code(code)
    context.set_details(exc.details() or f"the replica at {address} did not answer")
    return None

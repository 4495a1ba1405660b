"""A device's update in a secure_aggregator() round: masked, through SecAggService.

Order (protos/secagg.proto, "Enrollment in a round"): `start` as soon as the assignment is
known: in the background the device advertises its keys to the pending session, waits for it
to open, then shares its keys and waits for R1 to close, while it trains. `send_update` clips
and quantizes the trained delta into the field (device_runtime/secagg/secure_mean.py) and
sends it masked. The caller then reports its training metrics to the coordinator and calls
`finish`, which answers the unmasking request (and does not wait for the session's end).
"""

from __future__ import annotations

import asyncio
import math

import grpc
import numpy as np

from device_runtime import constants
from device_runtime.aggregation.norms import clip_l2
from device_runtime.identity import DeviceKey
from device_runtime.secagg.client import EarlyAdvertisement
from device_runtime.secagg.errors import SecAggError
from device_runtime.secagg.secure_mean import SecureMeanEncoding
from device_runtime.secagg.session_runner import SecAggSessionRunner, await_share_keys_request
from protos import device_pb2, secagg_pb2


def secure_mean_encoding(
    spec: device_pb2.AggregationSpec, config: secagg_pb2.SecAggSessionConfig
) -> SecureMeanEncoding:
    """The round's encoding. Raises SecAggError for a spec this runtime cannot follow."""
    if spec.encoding != constants.UPDATE_ENCODING_SECURE_SUM:
        raise SecAggError(f"a secure round needs encoding {constants.UPDATE_ENCODING_SECURE_SUM!r}")
    clip = spec.clipping.bound
    if not (math.isfinite(clip) and clip > 0):
        raise SecAggError(f"secure round's clipping bound must be positive, got {clip}")
    try:
        return SecureMeanEncoding(clip, spec.max_weight, config.num_clients, config.modulus_bits)
    except ValueError as exc:
        raise SecAggError(f"secure round's encoding refused: {exc}") from exc


class SecureUpload:
    def __init__(
        self,
        channel: grpc.aio.Channel,
        assignment: device_pb2.Assignment,
        device_key: DeviceKey | None = None,
    ) -> None:
        self._channel = channel
        self._device_key = device_key
        self._enrollment = assignment.secure_aggregation
        self._spec = assignment.aggregation
        self._runner: SecAggSessionRunner | None = None
        self._config = secagg_pb2.SecAggSessionConfig()
        self._keys: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Joins the session in the background (call from the event loop)."""
        self._keys = asyncio.ensure_future(self._join())

    async def _join(self) -> None:
        # Sent with the poll for the session's ShareKeysRequest: one call.
        advertised = EarlyAdvertisement.make(self._enrollment, self._device_key)
        request = await await_share_keys_request(self._channel, self._enrollment, advertised)
        self._config = config = request.session_config
        self._runner = SecAggSessionRunner(self._channel, config, self._device_key, advertised)
        await self._runner.share_keys(request)

    def cancel(self) -> None:
        """The device stops (interrupted, failed): it is a dropout of the session."""
        if self._keys is not None and not self._keys.done():
            self._keys.cancel()

    async def send_update(self, delta: np.ndarray, weight: float, rng: np.random.Generator) -> None:
        """Raises TransportError, SecAggAborted or SecAggError."""
        assert self._keys is not None, "start() first"
        await self._keys
        assert self._runner is not None
        encoding = secure_mean_encoding(self._spec, self._config)
        if delta.size + 1 != self._enrollment.vector_length:
            raise SecAggError(
                f"update has {delta.size} values, the session sums "
                f"{self._enrollment.vector_length - 1} plus the weight"
            )
        if not np.all(np.isfinite(delta)):
            # As TFF's FedAvg: a non-finite update counts, zeroed and weighted 0.
            delta, weight = np.zeros(delta.shape, np.float32), 0.0
        clipped, _ = clip_l2(delta.astype(np.float32), encoding.clip)
        quantized = await asyncio.to_thread(encoding.encode, clipped, weight, rng)
        await self._runner.send_masked_input(quantized)

    async def finish(self) -> None:
        """R3: reveals this device's shares; it does not wait for the session to end (the
        coordinator commits the round without it). Raises TransportError or SecAggAborted."""
        assert self._runner is not None, "send_update() first"
        await self._runner.reveal_shares()

    @property
    def sent_bytes(self) -> int:
        return self._runner.sent_bytes if self._runner is not None else 0

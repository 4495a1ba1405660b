"""The device's half of secure aggregation: a state machine over the four rounds.

Call order: `advertise_keys`, `share_keys`, `masked_input`, `unmasking_response`, each once,
each with the server message of the previous stage. A server message an honest server would
not send (non-neighbours, duplicated or tampered shares, a device listed as both dropped and
surviving...) aborts the session on this device: the method raises SecAggAborted and the
device sends `abort_message()`. Calling a method out of order raises SecAggError and changes
nothing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TypeVar

import numpy as np

from device_runtime import constants
from device_runtime.identity import DeviceKey
from device_runtime.secagg import (
    client_r0_advertise_keys,
    client_r1_share_keys,
    client_r2_masked_input,
    client_r3_unmasking,
    masking,
)
from device_runtime.secagg.client_state import ClientSession, ClientStage
from device_runtime.secagg.errors import SecAggAborted, SecAggError
from device_runtime.secagg.graph import NeighbourGraph
from device_runtime.secagg.key_agreement import KeyPair
from protos import secagg_pb2

log = logging.getLogger(__name__)
T = TypeVar("T")


class SecAggClient:
    def __init__(
        self, config: secagg_pb2.SecAggSessionConfig, device_key: DeviceKey | None = None
    ) -> None:
        """`device_key`: the device's enrolled key. With it the device signs its advertised
        keys and requires every neighbour's keys signed by the neighbour's enrolled key."""
        masking.check_modulus_bits(config.modulus_bits)
        if not 1 <= config.client_id <= config.num_clients:
            raise ValueError(f"client_id {config.client_id} is outside [1, {config.num_clients}]")
        self._session = ClientSession(
            config=config,
            graph=NeighbourGraph(config.graph_seed, config.num_clients, config.num_neighbours),
            encryption_keys=KeyPair.generate(),
            mask_keys=KeyPair.generate(),
            self_mask_seed=os.urandom(masking.seed_bytes),
            device_key=device_key,
        )

    @property
    def stage(self) -> ClientStage:
        return self._session.stage

    @property
    def client_id(self) -> int:
        return self._session.client_id

    @property
    def abort_reason(self) -> str:
        return self._session.abort_reason

    def _run(self, expected: ClientStage, following: ClientStage, step: Callable[[], T]) -> T:
        if self._session.stage is not expected:
            raise SecAggError(
                f"client {self.client_id} is at stage {self._session.stage.value}, "
                f"not {expected.value}"
            )
        try:
            result = step()
        except SecAggError as exc:
            self._session.stage = ClientStage.ABORTED
            self._session.abort_reason = str(exc)
            log.warning("secagg client %d aborts: %s", self.client_id, exc)
            raise SecAggAborted(str(exc)) from exc
        self._session.stage = following
        return result

    def advertise_keys(self) -> secagg_pb2.AdvertiseKeys:
        return self._run(
            ClientStage.ADVERTISE_KEYS,
            ClientStage.SHARE_KEYS,
            lambda: client_r0_advertise_keys.advertise_keys(self._session),
        )

    def share_keys(self, request: secagg_pb2.ShareKeysRequest) -> secagg_pb2.ShareKeys:
        return self._run(
            ClientStage.SHARE_KEYS,
            ClientStage.MASKED_INPUT,
            lambda: client_r1_share_keys.share_keys(self._session, request),
        )

    def masked_input(
        self, request: secagg_pb2.MaskedInputRequest, quantized: np.ndarray
    ) -> np.ndarray:
        """Raises ValueError (and stays at this stage) for an input of the wrong shape."""
        return self._run(
            ClientStage.MASKED_INPUT,
            ClientStage.UNMASKING,
            lambda: client_r2_masked_input.masked_input(self._session, request, quantized),
        )

    def unmasking_response(
        self, request: secagg_pb2.UnmaskingRequest
    ) -> secagg_pb2.UnmaskingResponse:
        return self._run(
            ClientStage.UNMASKING,
            ClientStage.COMPLETED,
            lambda: client_r3_unmasking.unmasking_response(self._session, request),
        )

    def server_aborted(self, reason: str) -> None:
        self._session.stage = ClientStage.ABORTED
        self._session.abort_reason = f"server aborted: {reason}"

    def envelope(self) -> secagg_pb2.SecAggClientMessage:
        """An empty client message carrying this device's session credentials."""
        config = self._session.config
        return secagg_pb2.SecAggClientMessage(
            protocol_version=constants.PROTOCOL_VERSION,
            session_id=config.session_id,
            client_id=config.client_id,
            session_token=config.session_token,
        )

    def abort_message(self) -> secagg_pb2.SecAggClientMessage:
        message = self.envelope()
        message.abort.reason = self._session.abort_reason or "client aborted"
        return message

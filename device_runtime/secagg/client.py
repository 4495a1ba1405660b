"""The device's half of secure aggregation: a state machine over the four rounds.

Call order: `advertise_keys`, `share_keys`, `masked_input`, `unmasking_response`, each once,
each with the server message of the previous stage. A device enrolled in a round's pending
session advertises first (`EarlyAdvertisement`, from its partial config) and builds its
client from the full config with it: the client then starts at `share_keys`. A server
message an honest server would not send (non-neighbours, duplicated or tampered shares, a
device listed as both dropped and surviving...) aborts the session on this device: the method
raises SecAggAborted and the device sends `abort_message()`. Calling a method out of order
raises SecAggError and changes nothing.
"""

from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass(frozen=True)
class EarlyAdvertisement:
    """A device's session secrets, made from its enrollment (partial config) before the
    session opened, and the signed AdvertiseKeys it sends the pending session."""

    session_id: bytes
    client_id: int
    encryption_keys: KeyPair
    mask_keys: KeyPair
    self_mask_seed: bytes
    message: secagg_pb2.SecAggClientMessage

    @staticmethod
    def make(
        enrollment: secagg_pb2.SecAggSessionConfig, device_key: DeviceKey | None = None
    ) -> EarlyAdvertisement:
        encryption_keys, mask_keys = KeyPair.generate(), KeyPair.generate()
        message = secagg_pb2.SecAggClientMessage(
            protocol_version=constants.PROTOCOL_VERSION,
            session_id=enrollment.session_id,
            client_id=enrollment.client_id,
            session_token=enrollment.session_token,
            advertise_keys=client_r0_advertise_keys.signed_advertisement(
                enrollment.session_id, enrollment.client_id, encryption_keys, mask_keys, device_key
            ),
        )
        return EarlyAdvertisement(
            enrollment.session_id,
            enrollment.client_id,
            encryption_keys,
            mask_keys,
            os.urandom(masking.seed_bytes),
            message,
        )


class SecAggClient:
    def __init__(
        self,
        config: secagg_pb2.SecAggSessionConfig,
        device_key: DeviceKey | None = None,
        advertised: EarlyAdvertisement | None = None,
    ) -> None:
        """`device_key`: the device's enrolled key. With it the device signs its advertised
        keys and requires every neighbour's keys signed by the neighbour's enrolled key.
        `advertised`: what this device advertised before the session opened; the client
        then uses those secrets and starts at SHARE_KEYS."""
        masking.check_modulus_bits(config.modulus_bits)
        if not 1 <= config.client_id <= config.num_clients:
            raise ValueError(f"client_id {config.client_id} is outside [1, {config.num_clients}]")
        graph = NeighbourGraph(config.graph_seed, config.num_clients, config.num_neighbours)
        if advertised is None:
            self._session = ClientSession(
                config=config,
                graph=graph,
                encryption_keys=KeyPair.generate(),
                mask_keys=KeyPair.generate(),
                self_mask_seed=os.urandom(masking.seed_bytes),
                device_key=device_key,
            )
            return
        if (advertised.session_id, advertised.client_id) != (config.session_id, config.client_id):
            raise ValueError("the early advertisement is for another session or client")
        self._session = ClientSession(
            config=config,
            graph=graph,
            encryption_keys=advertised.encryption_keys,
            mask_keys=advertised.mask_keys,
            self_mask_seed=advertised.self_mask_seed,
            device_key=device_key,
            stage=ClientStage.SHARE_KEYS,
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

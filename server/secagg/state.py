"""The interface every server state implements, with the refusals shared by all of them.

A state is told about client messages (`handle_*`), knows which devices it still waits for
(`waiting_for`), gives each participating device the server message that opened it
(`message_for`), and `close`s into the next state when everyone has spoken or the stage's
deadline passed. Handlers raise a CoordinatorError and change nothing when they refuse.
"""

from __future__ import annotations

import numpy as np

from protos import secagg_pb2
from server.errors import FailedPrecondition
from server.secagg.session_data import SessionData


class SecAggState:
    stage: secagg_pb2.SecAggStage = secagg_pb2.STAGE_UNSPECIFIED

    def __init__(self, data: SessionData) -> None:
        self.data = data

    @property
    def name(self) -> str:
        return secagg_pb2.SecAggStage.Name(self.stage)

    def _wrong_stage(self, what: str) -> FailedPrecondition:
        return FailedPrecondition(f"{what} is not taken at stage {self.name}")

    def handle_advertise_keys(self, client_id: int, message: secagg_pb2.AdvertiseKeys) -> None:
        raise self._wrong_stage("AdvertiseKeys")

    def handle_share_keys(self, client_id: int, message: secagg_pb2.ShareKeys) -> None:
        raise self._wrong_stage("ShareKeys")

    def handle_masked_input(self, client_id: int, masked: np.ndarray) -> None:
        raise self._wrong_stage("a masked input")

    def handle_unmasking_response(
        self, client_id: int, message: secagg_pb2.UnmaskingResponse
    ) -> None:
        raise self._wrong_stage("UnmaskingResponse")

    def participants(self) -> set[int]:
        """Devices this state sends a message to (and, if it collects, expects one from)."""
        return set()

    def waiting_for(self) -> set[int]:
        """Participants that have not spoken yet; empty when the state can close."""
        return set()

    def message_for(self, client_id: int) -> secagg_pb2.SecAggServerMessage:
        raise FailedPrecondition(f"client {client_id} takes no part in stage {self.name}")

    def close(self) -> SecAggState:
        """The next state. Terminal states return themselves."""
        return self

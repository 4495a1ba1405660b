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
        # Fixed when the stage opens; only aborts remove devices from it.
        self._participants = self._initial_participants() - data.aborted_clients
        self._waiting = set(self._participants)

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

    def _initial_participants(self) -> set[int]:
        return set()

    def participants(self) -> set[int]:
        """Devices this state sends a message to (and, if it collects, expects one from)."""
        return self._participants

    def drop(self, client_id: int) -> None:
        """A participant aborted: the stage no longer waits for it."""
        self._participants.discard(client_id)
        self._waiting.discard(client_id)

    def _spoke(self, client_id: int) -> None:
        """Handlers call this once they accepted a participant's message."""
        self._waiting.discard(client_id)

    def waiting_for(self) -> set[int]:
        """Participants that have not spoken yet; empty when the state can close."""
        return set(self._waiting)

    def complete(self) -> bool:
        return not self._waiting

    def message_for(self, client_id: int) -> secagg_pb2.SecAggServerMessage:
        raise FailedPrecondition(f"client {client_id} takes no part in stage {self.name}")

    def close(self) -> SecAggState:
        """The next state. Terminal states return themselves."""
        return self

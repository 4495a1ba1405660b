"""Terminal state: the sum of the surviving devices' inputs is known (and only that)."""

from __future__ import annotations

import numpy as np

from protos import secagg_pb2
from server.secagg.session_data import SessionData
from server.secagg.state import SecAggState


class CompletedState(SecAggState):
    stage = secagg_pb2.COMPLETED

    def __init__(self, data: SessionData, total: np.ndarray, summed: set[int]) -> None:
        self.total = total  # in Z_(2^b), uint32
        self.summed = frozenset(summed)
        super().__init__(data)

    def _initial_participants(self) -> set[int]:
        return set(self.summed)

    def message_for(self, client_id: int) -> secagg_pb2.SecAggServerMessage:
        return secagg_pb2.SecAggServerMessage(
            result=secagg_pb2.SessionResult(num_summed=len(self.summed))
        )

"""Terminal state: the session was aborted; every device is told why, nothing is summed."""

from __future__ import annotations

from protos import secagg_pb2
from server.secagg.session_data import SessionData
from server.secagg.state import SecAggState


class AbortedState(SecAggState):
    stage = secagg_pb2.ABORTED

    def __init__(self, data: SessionData, reason: str) -> None:
        super().__init__(data)
        self.reason = reason

    def message_for(self, client_id: int) -> secagg_pb2.SecAggServerMessage:
        return secagg_pb2.SecAggServerMessage(abort=secagg_pb2.Abort(reason=self.reason))

"""Server R2: forward key shares; sum masked inputs as they arrive (memory O(vector)).

Only devices that shared keys may send a masked input (no one holds shares of anyone
else's self mask), once. Closes into unmasking, aborting when some secret the unmasking needs
could not gather t shares: a survivor with fewer than t surviving neighbours, or a dropped
device whose masks survivors used but which has fewer than t surviving neighbours.
"""

from __future__ import annotations

import logging

import numpy as np

from device_runtime.secagg import masking
from protos import secagg_pb2
from server.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from server.secagg.aborted import AbortedState
from server.secagg.r3_unmasking import UnmaskingState
from server.secagg.state import SecAggState

log = logging.getLogger(__name__)


class MaskedInputCollectionState(SecAggState):
    stage = secagg_pb2.MASKED_INPUT_COLLECTION

    def _initial_participants(self) -> set[int]:
        return set(self.data.shared_keys)

    def message_for(self, client_id: int) -> secagg_pb2.SecAggServerMessage:
        inbox = self.data.mailbox.get(client_id, [])
        request = secagg_pb2.MaskedInputRequest(
            shares=[s for s in inbox if s.sender_id in self.data.shared_keys]
        )
        return secagg_pb2.SecAggServerMessage(masked_input_request=request)

    def handle_masked_input(self, client_id: int, masked: np.ndarray) -> None:
        data = self.data
        if client_id in data.masked_input_senders:
            raise AlreadyExists(f"client {client_id} already sent its masked input")
        if client_id not in data.shared_keys:
            raise FailedPrecondition(
                f"client {client_id} shared no keys, so its masked input could not be unmasked"
            )
        if masked.shape != (data.vector_length,) or masked.dtype != np.uint32:
            raise InvalidArgument(
                f"masked input has shape {masked.shape}, expected ({data.vector_length},) uint32"
            )
        if data.modulus_bits < masking.max_modulus_bits and (
            int(masked.max(initial=0)) >> data.modulus_bits
        ):
            raise InvalidArgument(f"masked input has values outside Z_(2^{data.modulus_bits})")
        if data.masked_sum is None:
            data.masked_sum = np.zeros(data.vector_length, np.uint32)
        data.masked_sum += masked
        data.masked_input_senders.add(client_id)
        self._spoke(client_id)

    def spare_holders(self) -> int:
        """How many more of its holders the worst-off secret could lose at unmasking and
        still be rebuilt, were the stage to close now (< 0: closing aborts). The secrets are
        the survivors' self-mask seeds and the mask keys of dropped devices whose pairwise
        masks survivors added; each needs t surviving neighbours to reveal shares."""
        data = self.data
        survivors = data.masked_input_senders
        if len(survivors) < data.threshold:
            return len(survivors) - data.threshold
        dropped = data.shared_keys - survivors
        needed = set(survivors) | {d for d in dropped if data.neighbours_in(d, survivors)}
        return min(len(data.neighbours_in(c, survivors)) for c in needed) - data.threshold

    def close(self) -> SecAggState:
        data = self.data
        survivors = data.masked_input_senders
        if self.spare_holders() >= 0:
            return UnmaskingState(data)
        if len(survivors) < data.threshold:
            reason = f"{len(survivors)} masked inputs, fewer than the threshold {data.threshold}"
        else:
            dropped = data.shared_keys - survivors
            needed = set(survivors) | {d for d in dropped if data.neighbours_in(d, survivors)}
            client = min(needed, key=lambda c: (len(data.neighbours_in(c, survivors)), c))
            reason = (
                f"client {client}'s masks need {data.threshold} surviving neighbours, "
                f"only {len(data.neighbours_in(client, survivors))} sent masked inputs"
            )
        log.warning("secagg session aborts after R2: %s", reason)
        return AbortedState(data, reason)

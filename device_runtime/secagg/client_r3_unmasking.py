"""Client R3: reveal, for each neighbour, the share the server needs and never both.

For a neighbour whose masked input arrived, the share of its self-mask seed; for one that
dropped out after sharing keys, the share of its mask key (to remove its pairwise masks).
If the server could get both for one device it could unmask that device's input, so the
client checks that the two lists are disjoint and cover exactly its neighbours.
"""

from __future__ import annotations

from device_runtime.secagg.client_state import ClientSession
from device_runtime.secagg.errors import SecAggError
from protos import secagg_pb2


def unmasking_response(
    session: ClientSession, request: secagg_pb2.UnmaskingRequest
) -> secagg_pb2.UnmaskingResponse:
    dropped, survivors = list(request.dropped_ids), list(request.survivor_ids)
    if len(set(dropped)) != len(dropped) or len(set(survivors)) != len(survivors):
        raise SecAggError("the unmasking request lists a neighbour twice")
    if set(dropped) & set(survivors):
        raise SecAggError(
            f"clients {sorted(set(dropped) & set(survivors))} are listed as both dropped and "
            f"surviving: answering would reveal their input"
        )
    if set(dropped) | set(survivors) != set(session.received_shares):
        raise SecAggError(
            "the unmasking request does not cover exactly the neighbours that shared keys"
        )
    if len(survivors) < session.threshold:
        raise SecAggError(
            f"only {len(survivors)} neighbours survived; the threshold is {session.threshold}"
        )
    response = secagg_pb2.UnmaskingResponse()
    for owner in sorted(survivors):
        share = session.received_shares[owner].self_mask_seed_share
        response.self_mask_seed_shares.add(owner_id=owner, value=share.value_bytes())
    for owner in sorted(dropped):
        share = session.received_shares[owner].mask_key_share
        response.mask_key_shares.add(owner_id=owner, value=share.value_bytes())
    return response

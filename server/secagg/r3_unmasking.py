"""Server R3: collect the revealed shares, reconstruct the secrets, and remove the masks.

Each surviving device tells, per neighbour, the share of its self-mask seed (if the
neighbour survived) or of its mask key (if it dropped after sharing keys); a response with
any other share is refused whole. At close, with t shares per secret:
  sum = masked sum - sum of survivors' self masks +- pairwise masks survivors shared with
        dropped devices (recomputed from the dropped device's reconstructed mask key).
A reconstructed mask key must match the public key its owner advertised; extra shares beyond
t must agree with the others. Either failure, or a secret with fewer than t shares, aborts.
"""

from __future__ import annotations

import logging

from device_runtime.secagg import masking, shamir
from device_runtime.secagg.client_r2_masked_input import pairwise_mask_seed
from device_runtime.secagg.errors import SecAggError
from device_runtime.secagg.key_agreement import KeyPair
from protos import secagg_pb2
from server.errors import AlreadyExists, InvalidArgument
from server.secagg.aborted import AbortedState
from server.secagg.completed import CompletedState
from server.secagg.state import SecAggState

log = logging.getLogger(__name__)


class UnmaskingState(SecAggState):
    stage = secagg_pb2.UNMASKING

    def _initial_participants(self) -> set[int]:
        return set(self.data.masked_input_senders)

    def _dropped_neighbours(self, client_id: int) -> set[int]:
        data = self.data
        return data.neighbours_in(client_id, data.shared_keys) - data.masked_input_senders

    def _surviving_neighbours(self, client_id: int) -> set[int]:
        return self.data.neighbours_in(client_id, self.data.masked_input_senders)

    def message_for(self, client_id: int) -> secagg_pb2.SecAggServerMessage:
        request = secagg_pb2.UnmaskingRequest(
            dropped_ids=sorted(self._dropped_neighbours(client_id)),
            survivor_ids=sorted(self._surviving_neighbours(client_id)),
        )
        return secagg_pb2.SecAggServerMessage(unmasking_request=request)

    def _parse(
        self, client_id: int, shares: list[secagg_pb2.SecretShare], expected: set[int], kind: str
    ) -> dict[int, shamir.Share]:
        owners = [s.owner_id for s in shares]
        if len(set(owners)) != len(owners):
            raise InvalidArgument(f"client {client_id} sent two {kind} shares for one device")
        if set(owners) != expected:
            raise InvalidArgument(
                f"client {client_id} must send {kind} shares for exactly {sorted(expected)}, "
                f"sent {sorted(owners)}"
            )
        try:
            return {s.owner_id: shamir.share_from_bytes(client_id, s.value) for s in shares}
        except SecAggError as exc:
            raise InvalidArgument(
                f"client {client_id} sent a malformed {kind} share: {exc}"
            ) from exc

    def handle_unmasking_response(
        self, client_id: int, message: secagg_pb2.UnmaskingResponse
    ) -> None:
        if client_id in self.data.unmasking_responders:
            raise AlreadyExists(f"client {client_id} already sent its unmasking response")
        seeds = self._parse(
            client_id,
            list(message.self_mask_seed_shares),
            self._surviving_neighbours(client_id),
            "self-mask seed",
        )
        keys = self._parse(
            client_id,
            list(message.mask_key_shares),
            self._dropped_neighbours(client_id),
            "mask key",
        )
        self.data.unmasking_responders.add(client_id)
        self._spoke(client_id)
        for owner, share in seeds.items():
            self.data.self_mask_seed_shares.setdefault(owner, []).append(share)
        for owner, share in keys.items():
            self.data.mask_key_shares.setdefault(owner, []).append(share)

    def _reconstruct(self, shares: dict[int, list[shamir.Share]], owner: int, kind: str) -> bytes:
        try:
            return shamir.reconstruct(shares.get(owner, []), self.data.threshold)
        except SecAggError as exc:
            raise SecAggError(f"cannot recover client {owner}'s {kind}: {exc}") from exc

    def close(self) -> SecAggState:
        try:
            return self._unmask()
        except SecAggError as exc:
            log.warning("secagg session aborts at unmasking: %s", exc)
            return AbortedState(self.data, str(exc))

    def _unmask(self) -> SecAggState:
        data = self.data
        assert data.masked_sum is not None  # R2 closes into this state only with inputs
        survivors = data.masked_input_senders
        total = data.masked_sum.copy()
        for owner in sorted(survivors):
            seed = self._reconstruct(data.self_mask_seed_shares, owner, "self-mask seed")
            masking.subtract_mask(total, seed)
        for dropped in sorted(data.shared_keys - survivors):
            users = self._surviving_neighbours(dropped)
            if not users:
                continue
            secret = self._reconstruct(data.mask_key_shares, dropped, "mask key")
            mask_keys = KeyPair.from_private_bytes(secret)
            if mask_keys.public_bytes() != data.advertised[dropped].mask_public_key:
                raise SecAggError(
                    f"client {dropped}'s mask key shares do not match its advertised key"
                )
            for survivor in sorted(users):
                seed = pairwise_mask_seed(
                    mask_keys, data.advertised[survivor].mask_public_key, data.session_id
                )
                # The survivor added the mask if its id is the smaller one: take it back out.
                if survivor < dropped:
                    masking.subtract_mask(total, seed)
                else:
                    masking.add_mask(total, seed)
        return CompletedState(data, masking.reduce(total, data.modulus_bits), set(survivors))

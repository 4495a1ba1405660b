"""What the server holds for one secure-aggregation session, shared by its states.

By design nothing here is, or can be turned into, one device's unmasked input: public keys,
ciphertexts the server cannot open, the running sum of masked inputs, the shares devices
reveal at unmasking (for each device either its self-mask seed or its mask key, never both)
and, at the end, the sum. tests/secagg/test_privacy_invariant.py checks this after each stage.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Container

import numpy as np

from device_runtime.secagg import shamir
from device_runtime.secagg.graph import NeighbourGraph
from device_runtime.secagg.parameters import SecAggParameters
from protos import secagg_pb2


@dataclasses.dataclass
class SessionData:
    session_id: bytes
    parameters: SecAggParameters
    graph_seed: bytes
    modulus_bits: int
    vector_length: int
    graph: NeighbourGraph
    token_by_client: dict[int, bytes]
    # Enrolled device keys (DER) by client id; empty for sessions outside coordinator rounds.
    device_keys: dict[int, bytes] = dataclasses.field(default_factory=dict)
    # R0: U1, the devices that advertised keys.
    advertised: dict[int, secagg_pb2.PairOfPublicKeys] = dataclasses.field(default_factory=dict)
    key_owners: dict[bytes, int] = dataclasses.field(default_factory=dict)  # no key twice
    key_signatures: dict[int, bytes] = dataclasses.field(default_factory=dict)
    # R1: U2, the devices that shared keys, and the ciphertexts waiting for each recipient.
    shared_keys: set[int] = dataclasses.field(default_factory=set)
    mailbox: dict[int, list[secagg_pb2.EncryptedKeyShares]] = dataclasses.field(
        default_factory=dict
    )
    # R2: U3, the devices whose masked input is in the running sum.
    masked_input_senders: set[int] = dataclasses.field(default_factory=set)
    masked_sum: np.ndarray | None = None
    # R3: U4, and the shares they revealed, by the device whose secret they are.
    unmasking_responders: set[int] = dataclasses.field(default_factory=set)
    self_mask_seed_shares: dict[int, list[shamir.Share]] = dataclasses.field(default_factory=dict)
    mask_key_shares: dict[int, list[shamir.Share]] = dataclasses.field(default_factory=dict)
    # Devices that aborted on their side: they count as dropped from then on.
    aborted_clients: set[int] = dataclasses.field(default_factory=set)

    @property
    def threshold(self) -> int:
        return self.parameters.threshold

    def neighbours_in(self, client_id: int, group: Container[int]) -> set[int]:
        return {c for c in self.graph.neighbours(client_id) if c in group}

    def session_config(self, client_id: int) -> secagg_pb2.SecAggSessionConfig:
        return secagg_pb2.SecAggSessionConfig(
            session_id=self.session_id,
            client_id=client_id,
            num_clients=self.parameters.num_clients,
            num_neighbours=self.parameters.num_neighbours,
            threshold=self.parameters.threshold,
            graph_seed=self.graph_seed,
            modulus_bits=self.modulus_bits,
            vector_length=self.vector_length,
            session_token=self.token_by_client[client_id],
        )

"""What a device remembers during one secure-aggregation session, round after round."""

from __future__ import annotations

import dataclasses
import enum

from device_runtime.identity import DeviceKey
from device_runtime.secagg.graph import NeighbourGraph
from device_runtime.secagg.key_agreement import KeyPair
from device_runtime.secagg.share_encryption import KeyShares
from protos import secagg_pb2


class ClientStage(enum.Enum):
    """The client message the device sends next (or that it is done)."""

    ADVERTISE_KEYS = "advertise_keys"
    SHARE_KEYS = "share_keys"
    MASKED_INPUT = "masked_input"
    UNMASKING = "unmasking"
    COMPLETED = "completed"
    ABORTED = "aborted"


@dataclasses.dataclass
class ClientSession:
    config: secagg_pb2.SecAggSessionConfig
    graph: NeighbourGraph
    encryption_keys: KeyPair
    mask_keys: KeyPair
    self_mask_seed: bytes
    device_key: DeviceKey | None = None  # the enrolled key; None outside coordinator rounds
    stage: ClientStage = ClientStage.ADVERTISE_KEYS
    # R1: the neighbours that advertised keys (U1), with their public keys.
    neighbour_keys: dict[int, secagg_pb2.PairOfPublicKeys] = dataclasses.field(default_factory=dict)
    # R1: the share-encryption key agreed with each of them, reused to decrypt in R2.
    share_keys_by_neighbour: dict[int, bytes] = dataclasses.field(default_factory=dict)
    # R2: the key shares received from neighbours that shared keys (U2).
    received_shares: dict[int, KeyShares] = dataclasses.field(default_factory=dict)
    abort_reason: str = ""

    @property
    def client_id(self) -> int:
        return self.config.client_id

    @property
    def session_id(self) -> bytes:
        return self.config.session_id

    @property
    def threshold(self) -> int:
        return self.config.threshold

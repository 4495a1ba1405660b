"""The server half of `secure_aggregator()` for one round: the round's secure-aggregation session.

Implements server.aggregation.UpdateAggregator, so the coordinator's round treats it like any
other aggregator, but no update ever reaches it: devices send their masked inputs to
SecAggService, and their UploadUpdate (encoding "secure_sum_v1") carries only the training
metrics, taken once that device's masked input is in the session's sum. `finalize` decodes the
weighted mean from the session's sum (server/secagg/secure_mean.py).

Life cycle, driven by server/secagg/round_bridge.py: `enroll` each device at selection (its
client id is its selection order), `open_session` when selection closes, `finalize` at commit.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Collection

import numpy as np

from device_runtime import constants as protocol
from device_runtime.aggregation.client import NormBound
from device_runtime.secagg import masking
from device_runtime.secagg.parameters import choose_parameters
from device_runtime.secagg.secure_mean import SecureMeanEncoding
from protos import device_pb2, secagg_pb2
from server.aggregators.config import SecureSumConfig
from server.errors import FailedPrecondition, InvalidArgument
from server.secagg.secure_mean import finalize_secure_mean
from server.secagg.server import SecAggServer, SessionEnrollment

log = logging.getLogger(__name__)
modulus_bits = masking.max_modulus_bits


def _digest(token: bytes) -> str:
    """The coordinator's key for an upload token (server.coordinator.token_digest)."""
    return hashlib.sha256(token).hexdigest()


class SecureSumRoundAggregator:
    encoding = protocol.UPDATE_ENCODING_SECURE_SUM

    def __init__(self, config: SecureSumConfig, num_parameters: int, weighted: bool) -> None:
        self.config = config
        self.num_parameters = num_parameters
        self.weighted = weighted
        self.enrollment = SessionEnrollment()
        self.session: SecAggServer | None = None
        self.open_failure = ""  # why the session could not open, if it could not
        self._client_by_token: dict[str, int] = {}
        self._reported: set[int] = set()

    @property
    def vector_length(self) -> int:
        return SecureMeanEncoding.vector_length(self.num_parameters)

    @property
    def count(self) -> int:
        """Metrics reports taken (each from a device whose masked input is in the sum)."""
        return len(self._reported)

    @property
    def total_weight(self) -> float:
        return 0.0  # known only from the secure sum, at finalize

    def client_spec(self) -> device_pb2.AggregationSpec:
        return device_pb2.AggregationSpec(
            encoding=self.encoding,
            clipping=NormBound(self.config.clip).to_proto(),
            max_weight=self.config.max_weight,
        )

    def enroll(
        self, token_sha256: str, device_public_key: bytes = b""
    ) -> secagg_pb2.SecAggSessionConfig:
        """A selected device's partial session config (completed when the session opens).
        `device_public_key`: its enrolled key (DER), which then signs its advertised keys."""
        if self.session is not None:
            raise FailedPrecondition("the round's secure-aggregation session already opened")
        client_id = len(self._client_by_token) + 1
        self._client_by_token[token_sha256] = client_id
        if device_public_key:
            self.enrollment.device_keys[client_id] = device_public_key
        return secagg_pb2.SecAggSessionConfig(
            session_id=self.enrollment.session_id,
            client_id=client_id,
            session_token=self.enrollment.enroll(client_id),
            modulus_bits=modulus_bits,
            vector_length=self.vector_length,
        )

    def client_id(self, token_sha256: str) -> int | None:
        return self._client_by_token.get(token_sha256)

    def open_session(self, failed_tokens: Collection[str] = ()) -> SecAggServer | None:
        """Selection closed: the session over every enrolled device, those of
        `failed_tokens` (they reported a failure) its first dropouts. None (and the round
        must fail) when so few devices were selected that no SecAgg parameters protect them."""
        try:
            parameters = choose_parameters(len(self._client_by_token))
        except ValueError as exc:
            self.open_failure = str(exc)
            log.warning("secure aggregation cannot start: %s", exc)
            return None
        dropped = {c for t in failed_tokens if (c := self._client_by_token.get(t)) is not None}
        self.session = SecAggServer(
            parameters, modulus_bits, self.vector_length, self.enrollment, dropped
        )
        return self.session

    def secure_mean_encoding(self) -> SecureMeanEncoding:
        if self.session is None:
            raise FailedPrecondition("the round's secure-aggregation session never opened")
        return SecureMeanEncoding(
            self.config.clip, self.config.max_weight, self.session.num_clients, modulus_bits
        )

    def expected_payload_bytes(self, header: device_pb2.UploadHeader) -> int:
        """Accepts only a metrics report, from a device whose masked input was taken."""
        if header.encoding != self.encoding:
            raise InvalidArgument(
                f"update encoding {header.encoding!r} is not this round's ({self.encoding!r}): "
                "a secure round's update goes masked through SecAggService"
            )
        if header.num_elements != self.num_parameters:
            raise InvalidArgument(
                f"update has {header.num_elements} elements, the model has {self.num_parameters}"
            )
        if header.example_count <= 0:
            raise InvalidArgument(f"example_count must be positive, got {header.example_count}")
        client = self._client_by_token.get(_digest(header.upload_token))
        if client is None or self.session is None or not self.session.took_masked_input(client):
            raise FailedPrecondition(
                "send the masked input to SecAggService first; this report is taken only once "
                "the update is in the secure sum"
            )
        return 0

    def accumulate(self, header: device_pb2.UploadHeader, payload: bytes | memoryview) -> None:
        self.expected_payload_bytes(header)
        if payload:
            raise InvalidArgument("a secure round's report carries no payload")
        client = self._client_by_token[_digest(header.upload_token)]
        self._reported.add(client)

    def finalize(self) -> tuple[np.ndarray, dict[str, float]]:
        """The weighted mean from the completed session. Raises FailedPrecondition if the
        session did not complete (the round then fails)."""
        if self.session is None:
            raise FailedPrecondition("the round's secure-aggregation session never opened")
        mean, metrics = finalize_secure_mean(self.session, self.secure_mean_encoding())
        metrics["aggregator/num_reports"] = metrics["aggregator/secure_sum/num_summed"]
        metrics["aggregator/secure_sum/num_clients"] = float(self.session.num_clients)
        metrics["aggregator/clipping/clipping_norm"] = self.config.clip
        return mean, metrics

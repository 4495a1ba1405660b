"""One secure-aggregation session on the coordinator: authentication, dispatch, stages.

Call order: create with the enrolled device count (ids 1..n) and hand each device its
`session_config`; then feed client messages to `receive` / `receive_masked_input` in any
order. A round's session is pending until its selection closes (`SessionEnrollment`): it
already takes the devices' advertised keys, so the session may open straight into
SHARE_KEYS. A stage closes by itself once every participant has spoken, or when
`close_stage` is called for it at its deadline (those who stayed silent count as dropped).
`server_message(id)` gives a device the message of the current stage. Every refusal is a
CoordinatorError (mapped to a gRPC status in one place), is logged, and changes nothing:
  UNAUTHENTICATED      wrong session, unknown client id or wrong session token
  FAILED_PRECONDITION  a message of another stage, or a device that is no longer a participant
  ALREADY_EXISTS       a second message of one stage from one device
  INVALID_ARGUMENT     malformed or inconsistent content
"""

from __future__ import annotations

import hmac
import logging
import secrets
from collections.abc import Collection

import numpy as np

from device_runtime import constants
from device_runtime.secagg import masking
from device_runtime.secagg.graph import NeighbourGraph
from device_runtime.secagg.parameters import SecAggParameters
from protos import secagg_pb2
from server.errors import CoordinatorError, FailedPrecondition, InvalidArgument, Unauthenticated
from server.secagg.aborted import AbortedState
from server.secagg.completed import CompletedState
from server.secagg.r0_advertise_keys import AdvertiseKeysState, take_advertisement
from server.secagg.r2_masked_input_collection import MaskedInputCollectionState
from server.secagg.session_data import SessionData
from server.secagg.state import SecAggState

log = logging.getLogger(__name__)
session_id_bytes = 16
graph_seed_bytes = 32
session_token_bytes = 16


class SessionEnrollment:
    """A session's id and its devices' tokens, fixed before the session's size is known."""

    def __init__(self) -> None:
        self.session_id = secrets.token_bytes(session_id_bytes)
        self.tokens: dict[int, bytes] = {}
        # Each device's enrolled public key (DER), when the coordinator knows it: then the
        # device must sign its advertised keys, and its neighbours get the key to check them.
        self.device_keys: dict[int, bytes] = {}
        # R0 taken early (r0_advertise_keys.KeyBook): the session opens with these.
        self.advertised: dict[int, secagg_pb2.PairOfPublicKeys] = {}
        self.key_owners: dict[bytes, int] = {}
        self.key_signatures: dict[int, bytes] = {}
        self.opened = False  # set by the SecAggServer that takes these over

    def enroll(self, client_id: int) -> bytes:
        """The client's session token (issued on first call)."""
        if client_id not in self.tokens:
            self.tokens[client_id] = secrets.token_bytes(session_token_bytes)
        return self.tokens[client_id]

    def check_credentials(self, session_id: bytes, client_id: int, token: bytes) -> None:
        expected = self.tokens.get(client_id)
        if (
            session_id != self.session_id
            or expected is None
            or not hmac.compare_digest(expected, token)
        ):
            raise Unauthenticated(f"unknown session, client {client_id} or session token")

    def advertise_early(self, message: secagg_pb2.SecAggClientMessage) -> None:
        """Takes a device's AdvertiseKeys before the session opens, checked as R0 checks it.
        Raises Unauthenticated, FailedPrecondition (another message, or another protocol
        version), AlreadyExists or InvalidArgument, keeping nothing."""
        if message.protocol_version != constants.PROTOCOL_VERSION:
            raise FailedPrecondition(
                f"protocol version {message.protocol_version} is not spoken; "
                f"this server speaks {constants.PROTOCOL_VERSION}"
            )
        self.check_credentials(message.session_id, message.client_id, message.session_token)
        if self.opened:
            raise FailedPrecondition("the session opened: its states take the messages now")
        if message.WhichOneof("message") != "advertise_keys":
            raise FailedPrecondition("the secure-aggregation session has not opened yet")
        take_advertisement(self, message.client_id, message.advertise_keys)


class SecAggServer:
    def __init__(
        self,
        parameters: SecAggParameters,
        modulus_bits: int,
        vector_length: int,
        enrollment: SessionEnrollment | None = None,
        dropped: Collection[int] = (),
    ) -> None:
        """`enrollment`: the session id and tokens already handed to the devices (a round
        enrolls devices before it knows how many there will be), with the keys they
        advertised so far; fresh ones otherwise. `dropped`: devices already known to be out
        (they reported a failure while the session was pending); their keys are not used."""
        masking.check_modulus_bits(modulus_bits)
        if vector_length < 1:
            raise ValueError(f"vector_length must be positive, got {vector_length}")
        # Seeds and tokens come from the OS CSPRNG: a predictable graph would let a client
        # choose to be its victim's neighbours.
        graph_seed = secrets.token_bytes(graph_seed_bytes)
        n = parameters.num_clients
        self.enrollment = enrollment = enrollment or SessionEnrollment()
        for client in range(1, n + 1):
            enrollment.enroll(client)
        if set(enrollment.tokens) != set(range(1, n + 1)):
            raise ValueError(f"the enrollment's client ids are not 1..{n}")
        self._data = SessionData(
            session_id=enrollment.session_id,
            parameters=parameters,
            graph_seed=graph_seed,
            modulus_bits=modulus_bits,
            vector_length=vector_length,
            graph=NeighbourGraph(graph_seed, n, parameters.num_neighbours),
            token_by_client=dict(enrollment.tokens),
            device_keys=dict(enrollment.device_keys),
            aborted_clients=set(dropped),
        )
        data = self._data
        enrollment.opened = True  # later messages go to this session's states
        for client, keys in enrollment.advertised.items():
            if client not in data.aborted_clients:
                data.advertised[client] = keys
                data.key_owners.update(
                    {keys.encryption_public_key: client, keys.mask_public_key: client}
                )
                data.key_signatures[client] = enrollment.key_signatures[client]
        self._state: SecAggState = AdvertiseKeysState(data)
        self._close_if_complete()  # everyone advertised while the session was pending

    @property
    def session_id(self) -> bytes:
        return self._data.session_id

    @property
    def stage(self) -> secagg_pb2.SecAggStage:
        return self._state.stage

    @property
    def abort_reason(self) -> str:
        return self._state.reason if isinstance(self._state, AbortedState) else ""

    @property
    def vector_length(self) -> int:
        return self._data.vector_length

    @property
    def modulus_bits(self) -> int:
        return self._data.modulus_bits

    def check_credentials(self, session_id: bytes, client_id: int, token: bytes) -> None:
        """Raises Unauthenticated unless the three match an enrolled device."""
        self._authenticate(session_id, client_id, token)

    @property
    def num_clients(self) -> int:
        return self._data.parameters.num_clients

    @property
    def num_neighbours(self) -> int:
        return self._data.parameters.num_neighbours

    @property
    def threshold(self) -> int:
        return self._data.parameters.threshold

    @property
    def masked_inputs(self) -> int:
        """Devices whose masked input is in the running sum so far."""
        return len(self._data.masked_input_senders)

    def took_masked_input(self, client_id: int) -> bool:
        return client_id in self._data.masked_input_senders

    def drop_client(self, client_id: int, reason: str) -> None:
        """The coordinator learned the device will not continue (e.g. it reported a
        failure): as if it had aborted. No-op for unknown ids and finished sessions."""
        if client_id in self._data.token_by_client:
            self._client_aborted(client_id, reason, logging.INFO)
            self._close_if_complete()

    def unmasking_may_close(self, client_id: int | None) -> bool:
        """Whether a message from `client_id` (None: a change the coordinator asks for) may
        end the unmasking stage, whose close rebuilds the secrets and expands the masks:
        O(n·m) work, for a worker thread. Every other call is O(1) or one pass over a vector."""
        if self._state.stage != secagg_pb2.UNMASKING:
            return False
        return client_id is None or self._state.waiting_for() <= {client_id}

    def waiting_for(self) -> set[int]:
        """Devices the current stage still waits for (empty once terminal)."""
        return self._state.waiting_for()

    def session_config(self, client_id: int) -> secagg_pb2.SecAggSessionConfig:
        if client_id not in self._data.token_by_client:
            raise InvalidArgument(f"no client {client_id} in this session")
        return self._data.session_config(client_id)

    def result(self) -> tuple[np.ndarray, int]:
        """The sum in Z_(2^b) (uint32) and how many devices it sums.

        Raises FailedPrecondition until the session completed (or when it aborted).
        """
        if not isinstance(self._state, CompletedState):
            raise FailedPrecondition(f"no result: the session is at stage {self._state.name}")
        return self._state.total, len(self._state.summed)

    def _authenticate(self, session_id: bytes, client_id: int, token: bytes) -> None:
        expected = self._data.token_by_client.get(client_id)
        if (
            session_id != self._data.session_id
            or expected is None
            or not hmac.compare_digest(expected, token)
        ):
            raise Unauthenticated(f"unknown session, client {client_id} or session token")
        if client_id in self._data.aborted_clients:
            raise FailedPrecondition(f"client {client_id} aborted; it takes no further part")

    def _refusing(self, client_id: int, what: str, exc: CoordinatorError) -> CoordinatorError:
        log.info("secagg refused %s from client %d: %s %s", what, client_id, exc.code.name, exc)
        return exc

    def receive(self, message: secagg_pb2.SecAggClientMessage) -> secagg_pb2.SecAggStage:
        """Takes one unary client message; returns the stage afterwards."""
        kind = message.WhichOneof("message")
        try:
            if message.protocol_version != constants.PROTOCOL_VERSION:
                raise FailedPrecondition(
                    f"protocol version {message.protocol_version} is not spoken; "
                    f"this server speaks {constants.PROTOCOL_VERSION}"
                )
            self._authenticate(message.session_id, message.client_id, message.session_token)
            client = message.client_id
            match kind:
                case "advertise_keys":
                    self._state.handle_advertise_keys(client, message.advertise_keys)
                case "share_keys":
                    self._state.handle_share_keys(client, message.share_keys)
                case "unmasking_response":
                    self._state.handle_unmasking_response(client, message.unmasking_response)
                case "abort":
                    self._client_aborted(client, message.abort.reason, logging.WARNING)
                case _:
                    raise InvalidArgument("the client message carries no content")
        except CoordinatorError as exc:
            raise self._refusing(message.client_id, kind or "an empty message", exc) from None
        self._close_if_complete()
        return self._state.stage

    def receive_masked_input(
        self, session_id: bytes, client_id: int, token: bytes, masked: np.ndarray
    ) -> secagg_pb2.SecAggStage:
        try:
            self._authenticate(session_id, client_id, token)
            self._state.handle_masked_input(client_id, masked)
        except CoordinatorError as exc:
            raise self._refusing(client_id, "a masked input", exc) from None
        self._close_if_complete()
        return self._state.stage

    def _client_aborted(self, client_id: int, reason: str, level: int) -> None:
        """`level`: WARNING for a device's own abort (it may have caught a substituted key),
        INFO for a dropout the coordinator learned of (a failure report; a device too late
        for R2 is one in most rounds at scale)."""
        if self._state.stage in (secagg_pb2.COMPLETED, secagg_pb2.ABORTED):
            return
        stage = self._state.name
        log.log(level, "secagg client %d dropped out at %s: %s", client_id, stage, reason)
        self._data.aborted_clients.add(client_id)
        self._state.drop(client_id)

    def _close_if_complete(self) -> None:
        while self._state.stage not in (secagg_pb2.COMPLETED, secagg_pb2.ABORTED):
            if not self._state.complete():
                return
            self._advance()

    def _advance(self) -> None:
        before = self._state.name
        self._state = self._state.close()
        log.info("secagg session %s: %s -> %s", self.session_id.hex()[:8], before, self._state.name)

    def close_stage(self, stage: secagg_pb2.SecAggStage) -> secagg_pb2.SecAggStage:
        """`stage`'s deadline passed: its silent devices count as dropped. A no-op once the
        session left `stage`: a close decided at one stage may be carried out after the
        devices' last messages already closed it, and must not cut the next stage short."""
        if self._state.stage == stage and stage not in (secagg_pb2.COMPLETED, secagg_pb2.ABORTED):
            self._advance()
            self._close_if_complete()
        return self._state.stage

    def close_masked_input_early(self) -> secagg_pb2.SecAggStage:
        """The round has enough masked inputs before the stage's deadline. Closes the stage
        only if every secret the unmasking needs keeps, beyond its t holders, the slack for
        the dropouts the parameters were chosen for (D): each device not yet heard from
        becomes a dropout, and a sparse graph tolerates only k - t per neighbourhood. A no-op
        otherwise, and once the session left the masked-input stage."""
        state = self._state
        if not isinstance(state, MaskedInputCollectionState):
            return state.stage
        spare = state.spare_holders()
        if spare < self._data.parameters.max_dropouts:
            log.info(
                "secagg session %s keeps collecting masked inputs: a secret would keep only "
                "%d holders beyond the threshold",
                self.session_id.hex()[:8],
                spare,
            )
            return state.stage
        return self.close_stage(state.stage)

    def abort(self, reason: str) -> None:
        """The coordinator gives up on the session (e.g. its round failed). A session that
        ended keeps its outcome, and an aborted one the reason it aborted for."""
        if self._state.stage not in (secagg_pb2.COMPLETED, secagg_pb2.ABORTED):
            self._state = AbortedState(self._data, reason)

    def server_message(
        self, session_id: bytes, client_id: int, token: bytes
    ) -> secagg_pb2.SecAggServerMessage:
        """The current stage's message for a device. FAILED_PRECONDITION if it dropped out."""
        self._authenticate(session_id, client_id, token)
        if isinstance(self._state, AbortedState):
            return self._state.message_for(client_id)
        if client_id not in self._state.participants():
            raise FailedPrecondition(
                f"client {client_id} takes no part in stage {self._state.name} (it dropped out)"
            )
        return self._state.message_for(client_id)

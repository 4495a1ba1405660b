"""Moves a 5-device session (complete graph, t = 3) stage by stage, for bad-input tests."""

from __future__ import annotations

import copy

import numpy as np

from device_runtime.identity import DeviceKey
from device_runtime.secagg.client import SecAggClient
from device_runtime.secagg.parameters import SecAggParameters
from protos import secagg_pb2
from server.secagg.server import SecAggServer, SessionEnrollment

N = 5
LENGTH = 50
MODULUS_BITS = 20
PARAMETERS = SecAggParameters(N, N - 1, 3, 1, 1)


def device_key_of(client_id: int) -> DeviceKey:
    return DeviceKey.from_seed(f"secagg-device-{client_id}".encode())


class Stepper:
    def __init__(self, seed: int = 0, signed: bool = False) -> None:
        """`signed`: the session knows each device's enrolled key (as in coordinator
        rounds), devices sign their advertised keys and check their neighbours'."""
        enrollment = SessionEnrollment()
        if signed:
            enrollment.device_keys = {c: device_key_of(c).public_key_der for c in range(1, N + 1)}
        self.server = SecAggServer(PARAMETERS, MODULUS_BITS, LENGTH, enrollment)
        self.clients = {
            c: SecAggClient(self.server.session_config(c), device_key_of(c) if signed else None)
            for c in range(1, N + 1)
        }
        rng = np.random.default_rng(seed)
        self.inputs = {
            c: rng.integers(0, 1 << 16, LENGTH, dtype=np.uint64).astype(np.uint32)
            for c in self.clients
        }

    def message_to(self, c: int) -> secagg_pb2.SecAggServerMessage:
        e = self.clients[c].envelope()
        return self.server.server_message(e.session_id, c, e.session_token)

    def advertise(self, c: int) -> secagg_pb2.SecAggClientMessage:
        message = self.clients[c].envelope()
        message.advertise_keys.CopyFrom(self.clients[c].advertise_keys())
        return message

    def share(self, c: int) -> secagg_pb2.SecAggClientMessage:
        message = self.clients[c].envelope()
        request = self.message_to(c).share_keys_request
        message.share_keys.CopyFrom(self.clients[c].share_keys(request))
        return message

    def masked(self, c: int) -> np.ndarray:
        request = self.message_to(c).masked_input_request
        return self.clients[c].masked_input(request, self.inputs[c])

    def send_masked(self, c: int, masked: np.ndarray) -> None:
        e = self.clients[c].envelope()
        self.server.receive_masked_input(e.session_id, c, e.session_token, masked)

    def unmask(self, c: int) -> secagg_pb2.SecAggClientMessage:
        message = self.clients[c].envelope()
        request = self.message_to(c).unmasking_request
        message.unmasking_response.CopyFrom(self.clients[c].unmasking_response(request))
        return message

    def to_share_keys(self, skip: set[int] = frozenset()) -> None:  # type: ignore[assignment]
        for c in self.clients:
            if c not in skip:
                self.server.receive(self.advertise(c))

    def to_masked_input(self, skip: set[int] = frozenset()) -> None:  # type: ignore[assignment]
        self.to_share_keys()
        for c in self.clients:
            if c not in skip:
                self.server.receive(self.share(c))

    def to_unmasking(self, skip: set[int] = frozenset()) -> None:  # type: ignore[assignment]
        self.to_masked_input()
        for c in self.clients:
            if c not in skip:
                self.send_masked(c, self.masked(c))

    def expected_sum(self, survivors: set[int]) -> np.ndarray:
        total = sum(self.inputs[c].astype(np.uint64) for c in survivors)
        return (np.asarray(total) % (1 << MODULUS_BITS)).astype(np.uint32)

    def snapshot(self) -> dict:
        """A deep copy of the server's session data, to check a refusal changed nothing."""
        data = self.server._data
        fields = {k: v for k, v in vars(data).items() if k != "graph"}
        return copy.deepcopy(fields)


def same_state(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray)):
                return False
            if not np.array_equal(x, y):
                return False
        elif x != y:
            return False
    return True

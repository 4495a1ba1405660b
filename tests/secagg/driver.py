"""Drives a whole secure-aggregation session in process: real crypto, no network.

Each device runs a real SecAggClient, the server a real SecAggServer; messages pass as the
protobufs the gRPC service carries. Dropouts are injected by stage: a device in
`dropouts.before_r0` never advertises keys, in `after_r0` stops after advertising, and so on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from device_runtime.secagg.client import SecAggClient
from device_runtime.secagg.client_state import ClientStage
from device_runtime.secagg.errors import SecAggAborted
from device_runtime.secagg.parameters import SecAggParameters
from protos import secagg_pb2
from server.secagg.server import SecAggServer


@dataclasses.dataclass
class Dropouts:
    before_r0: set[int] = dataclasses.field(default_factory=set)  # never advertise keys
    after_r0: set[int] = dataclasses.field(default_factory=set)  # advertise, share nothing
    after_r1: set[int] = dataclasses.field(default_factory=set)  # share keys, no masked input
    after_r2: set[int] = dataclasses.field(default_factory=set)  # masked input, no unmasking

    def silent_from(self, stage: int) -> set[int]:
        groups = [self.before_r0, self.after_r0, self.after_r1, self.after_r2]
        return set().union(*groups[: stage + 1])


STAGES = ("before_r0", "after_r0", "after_r1", "after_r2")


def random_dropouts(n: int, count: int, stage: str, rng: np.random.Generator) -> Dropouts:
    chosen = {int(c) for c in rng.choice(np.arange(1, n + 1), size=count, replace=False)}
    return Dropouts(**{stage: chosen})


def random_inputs(
    n: int, length: int, value_bits: int, rng: np.random.Generator
) -> dict[int, np.ndarray]:
    return {
        c: rng.integers(0, 1 << value_bits, size=length, dtype=np.uint64).astype(np.uint32)
        for c in range(1, n + 1)
    }


@dataclasses.dataclass
class SessionRun:
    server: SecAggServer
    clients: dict[int, SecAggClient]


Hook = Callable[[str, SecAggServer], None]


def _message(server: SecAggServer, client: SecAggClient) -> secagg_pb2.SecAggServerMessage:
    config = client.envelope()
    return server.server_message(config.session_id, config.client_id, config.session_token)


def run_session(
    parameters: SecAggParameters,
    inputs: dict[int, np.ndarray],
    modulus_bits: int = 32,
    dropouts: Dropouts | None = None,
    after_stage: Hook | None = None,
    tamper: Callable[[int, secagg_pb2.SecAggServerMessage], None] | None = None,
) -> SessionRun:
    """Runs every stage; `tamper(client_id, message)` may alter what a device receives."""
    dropouts = dropouts or Dropouts()
    length = len(next(iter(inputs.values())))
    server = SecAggServer(parameters, modulus_bits, length)
    clients = {
        c: SecAggClient(server.session_config(c)) for c in range(1, parameters.num_clients + 1)
    }
    hook = after_stage or (lambda name, s: None)

    def deliver(client: SecAggClient) -> secagg_pb2.SecAggServerMessage | None:
        if client.stage == ClientStage.ABORTED:
            return None
        message = _message(server, client)
        if tamper is not None:
            tamper(client.client_id, message)
        if message.WhichOneof("message") == "abort":
            client.server_aborted(message.abort.reason)
            return None
        return message

    def send_or_abort(
        client: SecAggClient, build: Callable[[], secagg_pb2.SecAggClientMessage]
    ) -> None:
        try:
            message = build()
        except SecAggAborted:
            server.receive(client.abort_message())
            return
        server.receive(message)

    for c, client in clients.items():
        if c in dropouts.silent_from(0):
            continue
        message = client.envelope()
        message.advertise_keys.CopyFrom(client.advertise_keys())
        server.receive(message)
    server.close_stage(secagg_pb2.ADVERTISE_KEYS)
    hook("advertise_keys", server)

    for c, client in clients.items():
        if c in dropouts.silent_from(1) or server.stage != secagg_pb2.SHARE_KEYS:
            continue
        request = deliver(client)
        if request is None:
            continue

        def build(
            client: SecAggClient = client, request: secagg_pb2.SecAggServerMessage = request
        ) -> secagg_pb2.SecAggClientMessage:
            message = client.envelope()
            message.share_keys.CopyFrom(client.share_keys(request.share_keys_request))
            return message

        send_or_abort(client, build)
    server.close_stage(secagg_pb2.SHARE_KEYS)
    hook("share_keys", server)

    for c, client in clients.items():
        if c in dropouts.silent_from(2) or server.stage != secagg_pb2.MASKED_INPUT_COLLECTION:
            continue
        request = deliver(client)
        if request is None:
            continue
        try:
            masked = client.masked_input(request.masked_input_request, inputs[c])
        except SecAggAborted:
            server.receive(client.abort_message())
            continue
        envelope = client.envelope()
        server.receive_masked_input(envelope.session_id, c, envelope.session_token, masked)
    server.close_stage(secagg_pb2.MASKED_INPUT_COLLECTION)
    hook("masked_input_collection", server)

    for c, client in clients.items():
        if c in dropouts.silent_from(3) or server.stage != secagg_pb2.UNMASKING:
            continue
        request = deliver(client)
        if request is None:
            continue

        def build_r3(
            client: SecAggClient = client, request: secagg_pb2.SecAggServerMessage = request
        ) -> secagg_pb2.SecAggClientMessage:
            message = client.envelope()
            message.unmasking_response.CopyFrom(
                client.unmasking_response(request.unmasking_request)
            )
            return message

        send_or_abort(client, build_r3)
    server.close_stage(secagg_pb2.UNMASKING)
    hook("unmasking", server)
    if server.stage == secagg_pb2.ABORTED:
        for client in clients.values():  # devices still waiting learn of the abort
            deliver(client)
    return SessionRun(server, clients)


def plaintext_sum(
    inputs: dict[int, np.ndarray], survivors: set[int], modulus_bits: int
) -> np.ndarray:
    total = np.zeros(len(next(iter(inputs.values()))), np.uint64)
    for c in survivors:
        total += inputs[c]
    return (total % (1 << modulus_bits)).astype(np.uint32)

"""Closing a stage from outside (its deadline, or the round's target met early)."""

from __future__ import annotations

import numpy as np

from device_runtime.secagg.client import SecAggClient
from device_runtime.secagg.parameters import SecAggParameters
from protos import secagg_pb2
from server.secagg.server import SecAggServer

# Complete graph over 6 devices, t = 3, chosen for D = 1 dropout.
PARAMETERS = SecAggParameters(6, 5, 3, 1, 1)
LENGTH = 10


def _session() -> tuple[SecAggServer, dict[int, SecAggClient]]:
    server = SecAggServer(PARAMETERS, 32, LENGTH)
    clients = {c: SecAggClient(server.session_config(c)) for c in range(1, 7)}
    return server, clients


def _request(server: SecAggServer, client: SecAggClient) -> secagg_pb2.SecAggServerMessage:
    e = client.envelope()
    return server.server_message(e.session_id, e.client_id, e.session_token)


def _advertise(server: SecAggServer, clients: dict[int, SecAggClient]) -> None:
    for client in clients.values():
        message = client.envelope()
        message.advertise_keys.CopyFrom(client.advertise_keys())
        server.receive(message)


def _share_keys(server: SecAggServer, clients: dict[int, SecAggClient]) -> None:
    for client in clients.values():
        message = client.envelope()
        request = _request(server, client).share_keys_request
        message.share_keys.CopyFrom(client.share_keys(request))
        server.receive(message)


def _send_masked(server: SecAggServer, clients: dict[int, SecAggClient], ids: range) -> None:
    for c in ids:
        request = _request(server, clients[c]).masked_input_request
        masked = clients[c].masked_input(request, np.full(LENGTH, c, np.uint32))
        e = clients[c].envelope()
        server.receive_masked_input(e.session_id, c, e.session_token, masked)


def test_a_deadline_close_ends_only_the_stage_it_was_asked_for() -> None:
    # Prepare: every device advertised its keys, so the session moved on to sharing them.
    server, clients = _session()
    _advertise(server, clients)

    # Execute: a close meant for the advertising stage arrives late.
    stage = server.close_stage(secagg_pb2.ADVERTISE_KEYS)

    # Assert: the key-sharing stage still waits for every device.
    assert stage == secagg_pb2.SHARE_KEYS
    assert server.waiting_for() == set(range(1, 7))


def test_an_early_close_that_would_leave_a_secret_no_slack_keeps_collecting() -> None:
    # Prepare: 4 of 6 masked inputs; each survivor has 3 surviving neighbours = t.
    server, clients = _session()
    _advertise(server, clients)
    _share_keys(server, clients)
    _send_masked(server, clients, range(1, 5))

    # Execute
    stage = server.close_masked_input_early()

    # Assert: closing would leave no holder to spare for a dropout at unmasking.
    assert stage == secagg_pb2.MASKED_INPUT_COLLECTION
    assert server.waiting_for() == {5, 6}


def test_an_early_close_that_keeps_the_slack_closes_the_stage() -> None:
    # Prepare: 5 of 6 masked inputs; every secret keeps t + 1 holders.
    server, clients = _session()
    _advertise(server, clients)
    _share_keys(server, clients)
    _send_masked(server, clients, range(1, 6))

    # Execute
    stage = server.close_masked_input_early()

    # Assert: unmasking asks the five survivors; device 6 counts as dropped.
    assert stage == secagg_pb2.UNMASKING
    assert server.waiting_for() == {1, 2, 3, 4, 5}
    assert list(_request(server, clients[1]).unmasking_request.dropped_ids) == [6]


def test_an_early_close_is_a_no_op_at_any_other_stage() -> None:
    server, clients = _session()
    _advertise(server, clients)

    stage = server.close_masked_input_early()

    assert stage == secagg_pb2.SHARE_KEYS
    assert server.waiting_for() == set(range(1, 7))

"""The coordinator's side of a secure round (server/secagg/round_bridge.py), in process.

Real SecAggService, SecAggServer and device clients on one event loop; the coordinator's
calls (`next_state` at a tick) are made by hand, as the coordinator would make them.
"""

from __future__ import annotations

import asyncio

import numpy as np

from device_runtime.secagg.client import SecAggClient
from protos import secagg_pb2
from server.aggregators.config import SecureSumConfig
from server.rounds.round import RoundInProgress
from server.secagg.round_aggregator import SecureSumRoundAggregator
from server.secagg.round_bridge import SecureRounds
from server.secagg.server import SecAggServer
from server.store import RoundState
from tests.harness import task_config

NUM_PARAMETERS = 20
START = 1000.0


def _secure_round(devices: int) -> tuple[SecureRounds, RoundInProgress, SecAggServer]:
    aggregate = SecureSumRoundAggregator(SecureSumConfig(), NUM_PARAMETERS, weighted=True)
    round_ = RoundInProgress("t1", 1, aggregate, START, "sha", 0)
    rounds = SecureRounds()
    for device in range(devices):
        rounds.enroll(round_, f"token{device}")
    round_.state = RoundState.REPORTING
    round_.reporting_started_at = START
    rounds.selection_closed(round_, [])
    assert aggregate.session is not None
    return rounds, round_, aggregate.session


async def _settle() -> None:
    """Until the session changes the bridge asked for (tasks of their own) are done."""
    while others := asyncio.all_tasks() - {asyncio.current_task()}:
        await asyncio.wait(others)


def _message(session: SecAggServer, client: SecAggClient) -> secagg_pb2.SecAggServerMessage:
    e = client.envelope()
    return session.server_message(e.session_id, e.client_id, e.session_token)


def _to_masked_input(session: SecAggServer) -> dict[int, SecAggClient]:
    clients = {
        c: SecAggClient(session.session_config(c)) for c in range(1, session.num_clients + 1)
    }
    for client in clients.values():
        message = client.envelope()
        message.advertise_keys.CopyFrom(client.advertise_keys())
        session.receive(message)
    for client in clients.values():
        message = client.envelope()
        message.share_keys.CopyFrom(client.share_keys(_message(session, client).share_keys_request))
        session.receive(message)
    return clients


def _masked(session: SecAggServer, client: SecAggClient) -> tuple[bytes, int, bytes, np.ndarray]:
    request = _message(session, client).masked_input_request
    quantized = np.full(session.vector_length, client.client_id, np.uint32)
    e = client.envelope()
    return e.session_id, e.client_id, e.session_token, client.masked_input(request, quantized)


def test_a_close_queued_behind_the_message_that_ends_its_stage_leaves_the_next_stage_open() -> None:
    # Prepare: five devices at the masked-input stage, four inputs in (the round's target).
    config = task_config(target_reports=4, over_selection=1.25, min_reports=3)
    rounds, round_, session = _secure_round(5)
    clients = _to_masked_input(session)
    for c in (1, 2, 3, 4):
        session.receive_masked_input(*_masked(session, clients[c]))
    last = _masked(session, clients[5])

    async def scenario() -> None:
        service = rounds.service
        # The fifth input already waits for the session when the tick, seeing the target
        # met, asks for the masked-input stage to close: the input ends the stage first.
        fifth = asyncio.ensure_future(
            service.apply(session.session_id, lambda s: s.receive_masked_input(*last))
        )
        state = rounds.next_state(round_, config, START + 1.0)
        await fifth
        await _settle()  # the close, too

        # Execute + Assert: the unmasking stage is open for the five devices' responses.
        assert state is RoundState.REPORTING
        assert session.stage == secagg_pb2.UNMASKING, session.abort_reason
        assert session.waiting_for() == {1, 2, 3, 4, 5}

    asyncio.run(scenario())


def test_past_the_target_each_masked_input_may_close_the_stage_early() -> None:
    # Prepare: 7 devices (complete graph, t = 4, slack for D = 1 dropout), target 5.
    config = task_config(target_reports=5, over_selection=1.4, min_reports=4)
    rounds, round_, session = _secure_round(7)
    assert (session.num_neighbours, session.threshold) == (6, 4)
    clients = _to_masked_input(session)

    async def scenario() -> list[int]:
        service, stages = rounds.service, []
        for c in (1, 2, 3, 4, 5, 6):
            await service.apply(
                session.session_id,
                lambda s, c=c: s.receive_masked_input(*_masked(s, clients[c])),
            )
            rounds.next_state(round_, config, START + 1.0)
            await _settle()  # the close, if one was asked for
            stages.append(session.stage)
        return stages

    # Execute: inputs arrive one by one; the round's tick follows each.
    stages = asyncio.run(scenario())

    # Assert: at 5 inputs a survivor would keep t neighbours and no slack, so the stage
    # waits; the 6th leaves every secret t + 1 holders, and the stage closes without 7.
    assert stages == [secagg_pb2.MASKED_INPUT_COLLECTION] * 5 + [secagg_pb2.UNMASKING]
    assert session.waiting_for() == {1, 2, 3, 4, 5, 6}

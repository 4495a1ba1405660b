"""A device refuses server messages an honest server would not send, and aborts cleanly."""

import logging

import numpy as np
import pytest

from device_runtime.secagg.client_state import ClientStage
from device_runtime.secagg.errors import SecAggAborted, SecAggError
from device_runtime.secagg.parameters import choose_parameters
from protos import secagg_pb2
from tests.secagg.driver import plaintext_sum, random_inputs, run_session
from tests.secagg.stepper import Stepper


def test_a_tampered_ciphertext_makes_its_recipient_abort_and_the_rest_sum_without_it() -> None:
    rng = np.random.default_rng(9)
    n = 50
    inputs = random_inputs(n, 100, 32, rng)

    def tamper(client_id: int, message: secagg_pb2.SecAggServerMessage) -> None:
        if client_id == 7 and message.WhichOneof("message") == "masked_input_request":
            shares = message.masked_input_request.shares[0]
            shares.ciphertext = shares.ciphertext[:-1] + bytes([shares.ciphertext[-1] ^ 1])

    run = run_session(choose_parameters(n), inputs, 32, tamper=tamper)

    assert run.clients[7].stage == ClientStage.ABORTED
    assert "fail authentication" in run.clients[7].abort_reason
    total, count = run.server.result()
    assert count == n - 1
    assert np.array_equal(total, plaintext_sum(inputs, set(range(1, n + 1)) - {7}, 32))


def test_a_neighbour_list_with_a_stranger_is_refused() -> None:
    s = Stepper()
    s.to_share_keys()
    request = s.message_to(1).share_keys_request
    request.neighbours[0].client_id = 1  # itself: never its own neighbour

    with pytest.raises(SecAggAborted, match="non-neighbours"):
        s.clients[1].share_keys(request)
    assert s.clients[1].stage == ClientStage.ABORTED
    assert s.clients[1].abort_message().abort.reason


def test_a_neighbour_reusing_a_key_is_refused() -> None:
    s = Stepper()
    s.to_share_keys()
    request = s.message_to(1).share_keys_request
    request.neighbours[1].keys.mask_public_key = request.neighbours[0].keys.mask_public_key

    with pytest.raises(SecAggAborted, match="reuses an advertised key"):
        s.clients[1].share_keys(request)


def test_too_few_neighbours_with_keys_is_refused() -> None:
    s = Stepper()
    s.to_share_keys()
    request = s.message_to(1).share_keys_request
    del request.neighbours[2:]

    with pytest.raises(SecAggAborted, match="threshold is 3"):
        s.clients[1].share_keys(request)


def test_a_device_listed_as_both_dropped_and_surviving_gets_no_share() -> None:
    # The attack SecAgg's two secrets exist to stop: both shares would unmask device 2.
    s = Stepper()
    s.to_unmasking()
    request = s.message_to(1).unmasking_request
    request.dropped_ids.append(2)

    with pytest.raises(SecAggAborted, match="both dropped and surviving"):
        s.clients[1].unmasking_response(request)


def test_an_unmasking_request_missing_a_neighbour_is_refused() -> None:
    s = Stepper()
    s.to_unmasking()
    request = s.message_to(1).unmasking_request
    del request.survivor_ids[0]

    with pytest.raises(SecAggAborted, match="cover exactly"):
        s.clients[1].unmasking_response(request)


def test_calls_out_of_order_change_nothing() -> None:
    s = Stepper()

    with pytest.raises(SecAggError, match="at stage advertise_keys, not unmasking"):
        s.clients[1].unmasking_response(secagg_pb2.UnmaskingRequest())
    assert s.clients[1].stage == ClientStage.ADVERTISE_KEYS


def test_an_input_of_the_wrong_shape_is_a_value_error_and_keeps_the_stage() -> None:
    s = Stepper()
    s.to_masked_input()
    request = s.message_to(1).masked_input_request

    with pytest.raises(ValueError, match="shape"):
        s.clients[1].masked_input(request, np.zeros(3, np.uint32))
    assert s.clients[1].stage == ClientStage.MASKED_INPUT


def test_a_devices_own_abort_is_a_warning_and_a_reported_failure_is_not(caplog) -> None:
    # A device's abort may mean it caught a substituted key: operators should see it. A
    # failure report is a dropout, as a device too late for R2 is in most rounds at scale.
    s = Stepper()
    s.to_share_keys()
    with caplog.at_level(logging.INFO, logger="server.secagg.server"):
        abort = s.clients[1].envelope()
        abort.abort.reason = "client 3's keys are not signed by its enrolled key"
        s.server.receive(abort)
        s.server.drop_client(2, "reported a failure")
    levels = {r.getMessage().split(":")[0]: r.levelno for r in caplog.records}
    assert levels["secagg client 1 dropped out at SHARE_KEYS"] == logging.WARNING
    assert levels["secagg client 2 dropped out at SHARE_KEYS"] == logging.INFO

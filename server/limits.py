"""Bounds the coordinator enforces on what devices and operators send (units in the names).

Every request is hostile until checked. gRPC's own receive limit is per server, so the limit
of each method is applied where its request is decoded (server/request_guard.py); strings are
bounded field by field, and every number of a task config has a range (server/config.py).
"""

from __future__ import annotations

from device_runtime import constants as protocol

# ----- request sizes, per method (full gRPC method name -> bytes) ----------------------------

DEVICE_SERVICE = "/overnight.v1.DeviceService/"
ADMIN_SERVICE = "/overnight.v1.AdminService/"
SECAGG_SERVICE = "/overnight.v1.SecAggService/"

max_check_in_bytes = 64 << 10
max_small_request_bytes = 64 << 10  # downloads, failure reports, admin queries
# Upload and masked-input chunks: one chunk of at most max_upload_chunk_bytes plus its framing.
max_chunk_message_bytes = protocol.max_upload_chunk_bytes + (64 << 10)
# SecAgg R1 carries one encrypted share bundle per neighbour: O(log n) of ~300 bytes each, far
# below this even for complete graphs of a thousand devices.
max_secagg_message_bytes = 1 << 20
# RegisterTask carries a whole model.
max_register_task_bytes = 256 << 20

max_request_bytes_by_method: dict[str, int] = {
    DEVICE_SERVICE + "Enroll": max_small_request_bytes,
    DEVICE_SERVICE + "CheckIn": max_check_in_bytes,
    DEVICE_SERVICE + "Download": max_small_request_bytes,
    DEVICE_SERVICE + "UploadUpdate": max_chunk_message_bytes,
    DEVICE_SERVICE + "ReportFailure": max_small_request_bytes,
    SECAGG_SERVICE + "Send": max_secagg_message_bytes,
    SECAGG_SERVICE + "SendMaskedInput": max_chunk_message_bytes,
    SECAGG_SERVICE + "AwaitServerMessage": max_secagg_message_bytes,  # may carry a message
    ADMIN_SERVICE + "RegisterTask": max_register_task_bytes,
}
# Methods not listed above (admin queries, and any added later) get the small limit.
default_max_request_bytes = max_small_request_bytes

# ----- strings -----------------------------------------------------------------------------

max_string_bytes = 4 << 10  # any string field not listed below
max_string_bytes_by_field: dict[str, int] = {
    "overnight.v1.CheckInRequest.device_id": 128,
    "overnight.v1.CheckInRequest.population": 128,
    "overnight.v1.CheckInRequest.runtime_version": 64,
    "overnight.v1.EnrollRequest.population": 128,
    "overnight.v1.DownloadRequest.sha256": 64,
    "overnight.v1.UploadHeader.encoding": 64,
}
max_task_id_bytes = 128
max_population_bytes = 128
max_version_string_bytes = 64
max_aggregator_expression_bytes = 1024

# ----- streams and connections -------------------------------------------------------------

# An upload (or masked-input) stream that sends nothing for this long is cancelled, and frees
# the upload slot it held.
upload_idle_timeout_s = 30.0
# ... and one that, once it is older than the idle time, has averaged less than this is
# cancelled too: a trickle (a byte every 29 s) would otherwise hold its slot until the round's
# reporting deadline. 1 KiB/s is far below the slowest mobile uplink that finishes an upload.
min_upload_bytes_per_s = 1024.0
# A client stream the coordinator is done with (refused, or complete) is read to its end, up
# to this many more messages, before the call ends (server/request_guard.py).
max_drained_messages = 64
# A phone makes one or two calls at a time (a SecAgg long poll beside its work); the emulator
# puts 256 phones on one connection (emulator/fleet_worker.py), whose rare extra calls queue
# at the client rather than fail.
max_concurrent_streams_per_connection = 256
# The server pings an idle connection after this long and drops it when no ack comes back
# within the timeout; clients may not ping more often than the minimum interval (a device
# pings every device_runtime.constants.keepalive_time_s while a call is in flight, so it
# finds a hung coordinator before its call's deadline; this leaves it room to spare).
keepalive_time_ms = 60_000
keepalive_timeout_ms = 20_000
min_client_ping_interval_ms = 5_000
max_ping_strikes = 2

# ----- task configs ------------------------------------------------------------------------

max_total_rounds = 1_000_000
max_target_reports = 100_000
max_over_selection = 10.0
max_deadline_s = 7 * 24 * 3600.0
max_concurrent_rounds = 16
max_epochs = 1_000
max_batch_size = 65_536
max_examples_per_device = 1 << 31  # upper limit of TaskConfig.max_examples_per_device
default_max_examples_per_device = 1_000_000
max_separation_s = 366 * 24 * 3600.0
max_optimizer_parameter = 1e6  # learning rates, momenta, epsilons, FedProx mu

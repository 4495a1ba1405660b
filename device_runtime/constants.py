"""Constants of the device runtime and of the wire protocol it speaks (units in the names)."""

PROTOCOL_VERSION = 1
RUNTIME_VERSION = "0.1.0"
UPDATE_ENCODING_FLOAT32_DELTA = "float32_delta"
REPORT_ENCODING_EVALUATION = "evaluation"  # federated evaluation: metrics, no payload
UPDATE_ENCODING_V1 = "overnight_encoded_v1"  # layout: device_runtime/aggregation/codec.py
# secure_aggregator(): the update goes masked through SecAggService; the upload carries metrics.
UPDATE_ENCODING_SECURE_SUM = "secure_sum_v1"

chunk_size_bytes = 1 << 20  # download and upload chunk size; well under gRPC's 4 MiB default
max_message_bytes = 8 << 20  # any single gRPC message, both directions
max_upload_chunk_bytes = 4 << 20  # the coordinator refuses larger upload chunks
rpc_timeout_s = 30.0
# How long a device waits before re-checking its conditions when it is not eligible.
ineligible_poll_s = 60.0
# Used when the coordinator is unreachable: exponential backoff bounds.
unreachable_backoff_min_s = 1.0
unreachable_backoff_max_s = 300.0
# Trailing metadata of an UNAVAILABLE answer: seconds until the coordinator can serve again.
retry_after_metadata = "retry-after-s"

# Several coordinators (device_runtime/channel.py): a device call that fails UNAVAILABLE is
# tried again on the next coordinator by gRPC's retry policy, this many times in all (gRPC
# caps it at 5), after a backoff between these bounds, each time with up to this much of the
# call's messages held for replay (an upload larger than this is not replayed: the device
# reports the round failed and checks in again).
DEVICE_SERVICE = "overnight.v1.DeviceService"
failover_attempts = 3
failover_backoff_min_s = 0.1
failover_backoff_max_s = 1.0
failover_buffer_bytes = 32 << 20
# While a call is in flight (never on an idle connection: a phone's radio stays asleep), the
# device pings its coordinator after this long without hearing from it, and drops the
# connection when no answer comes back in the timeout. A coordinator that hangs (a stopped
# process, a partition) then fails the call UNAVAILABLE in at most the sum, well inside
# `rpc_timeout_s`, and the retry policy takes it to the next coordinator; without pings the
# call waits for its deadline. The timeout is generous because a ping queues behind an upload
# on a slow, buffered uplink. The coordinator accepts pings this often (server/limits.py).
keepalive_time_s = 10.0
keepalive_timeout_s = 10.0

"""Seeded malformed requests for every RPC of the coordinator, sent as raw bytes over gRPC.

Each case starts from a valid request (with a real upload token or task id where one exists)
and breaks it: random bytes, truncation, bit flips, out-of-range enum values, oversized
strings and bytes, appended fields of random wire types, or, for client streams, a broken
message anywhere in the stream. `documented_codes` reads, from the .proto comments, the status
codes each RPC may answer; the suite's fuzz test (tests/server/test_request_fuzzing.py) and
the longer benchmark (benchmarks/fuzz_requests.py) check every answer against them.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import pathlib
import re
from collections.abc import Callable

import grpc
import numpy as np
from google.protobuf import descriptor, message

from device_runtime import constants
from protos import admin_pb2, common_pb2, device_pb2, secagg_pb2

PROTOS = pathlib.Path(__file__).resolve().parents[1] / "protos"
V = constants.PROTOCOL_VERSION
_CODE_NAMES = {code.name for code in grpc.StatusCode}


def documented_codes() -> dict[str, set[grpc.StatusCode]]:
    """Full method name -> the codes its .proto comments name: the file's header comment
    (codes common to the service) plus the comment block right above the rpc. OK included."""
    codes: dict[str, set[grpc.StatusCode]] = {}
    for path in sorted(PROTOS.glob("*.proto")):
        text = path.read_text()
        package = re.search(r"^package ([\w.]+);", text, re.M)
        assert package is not None
        header = text[: text.index("\nservice ")] if "\nservice " in text else text
        common = _codes_in(header)
        comment: list[str] = []
        service = ""
        for line in text.splitlines():
            stripped = line.strip()
            if match := re.match(r"service (\w+)", stripped):
                service = match.group(1)
            if stripped.startswith("//"):
                comment.append(stripped)
                continue
            if match := re.match(r"rpc (\w+)\(", stripped):
                name = f"/{package.group(1)}.{service}/{match.group(1)}"
                codes[name] = {grpc.StatusCode.OK} | common | _codes_in("\n".join(comment))
            comment = []
    return codes


def _codes_in(text: str) -> set[grpc.StatusCode]:
    words = set(re.findall(r"\b[A-Z][A-Z_]+\b", text)) & _CODE_NAMES
    return {grpc.StatusCode[w] for w in words}


@dataclasses.dataclass(frozen=True)
class Rpc:
    method: str
    streaming_in: bool
    streaming_out: bool
    seeds: tuple[message.Message, ...]  # valid requests (for streams: valid first messages)
    tail: tuple[message.Message, ...] = ()  # streams: valid messages after the first


@dataclasses.dataclass(frozen=True)
class Case:
    rpc: Rpc
    messages: list[bytes]  # one request, or a client stream's messages


def rpcs(
    population: str,
    task_id: str,
    tokens: list[bytes],
    resource_sha256: str,
    model_bytes: bytes,
    num_parameters: int,
    *,
    enroll: device_pb2.EnrollRequest,
    check_in: device_pb2.CheckInRequest,
    sign_header: Callable[[device_pb2.UploadHeader], device_pb2.UploadHeader],
    sign_failure: Callable[[device_pb2.FailureReport], device_pb2.FailureReport],
) -> list[Rpc]:
    """Every RPC of the device, admin and secure-aggregation services, with valid seeds built
    from a running coordinator's state. Device messages are signed (device.proto): `enroll`
    and `check_in` are valid signed requests of an enrolled device (a repeated check-in is a
    replay, as any resent one would be); `sign_header` and `sign_failure` sign with the key
    a token was issued to."""
    device, admin, secagg = (
        "/overnight.v1.DeviceService/",
        "/overnight.v1.AdminService/",
        "/overnight.v1.SecAggService/",
    )
    headers = [
        device_pb2.UploadChunk(
            header=sign_header(
                device_pb2.UploadHeader(
                    protocol_version=V,
                    upload_token=token,
                    example_count=5,
                    num_elements=num_parameters,
                    encoding=constants.UPDATE_ENCODING_FLOAT32_DELTA,
                    metrics=common_pb2.ClientMetrics(loss=1.0, accuracy=0.5, num_examples=5),
                )
            )
        )
        for token in tokens
    ]
    data = device_pb2.UploadChunk(data=np.zeros(num_parameters, "<f4").tobytes())
    config = admin_pb2.TaskConfig(
        task_id="fuzzed", population=population, total_rounds=2, target_reports=2
    )
    envelope = dict(protocol_version=V, session_id=b"s" * 16, client_id=1, session_token=b"t" * 32)
    masked_header = secagg_pb2.MaskedInputChunk(
        header=secagg_pb2.MaskedInputHeader(**envelope, vector_length=num_parameters + 1)  # type: ignore[arg-type]
    )
    return [
        Rpc(device + "Enroll", False, False, (enroll,)),
        Rpc(device + "CheckIn", False, False, (check_in,)),
        Rpc(
            device + "Download",
            False,
            True,
            (device_pb2.DownloadRequest(protocol_version=V, sha256=resource_sha256),),
        ),
        Rpc(device + "UploadUpdate", True, False, tuple(headers), (data,)),
        Rpc(
            device + "ReportFailure",
            False,
            False,
            tuple(
                sign_failure(
                    device_pb2.FailureReport(
                        protocol_version=V,
                        upload_token=token,
                        cause=device_pb2.FailureReport.INTERRUPTED,
                        message="picked up",
                    )
                )
                for token in tokens
            ),
        ),
        Rpc(
            admin + "RegisterTask",
            False,
            False,
            (
                admin_pb2.RegisterTaskRequest(
                    protocol_version=V, config=config, model_tflite=b"not a model"
                ),
                admin_pb2.RegisterTaskRequest(
                    protocol_version=V, config=config, model_tflite=model_bytes
                ),
            ),
        ),
        Rpc(
            admin + "GetTaskStatus",
            False,
            False,
            (admin_pb2.GetTaskStatusRequest(protocol_version=V, task_id=task_id),),
        ),
        Rpc(
            admin + "ListRounds",
            False,
            False,
            (admin_pb2.ListRoundsRequest(protocol_version=V, task_id=task_id),),
        ),
        Rpc(admin + "ListTasks", False, False, (admin_pb2.ListTasksRequest(protocol_version=V),)),
        Rpc(
            admin + "DownloadWeights",
            False,
            True,
            (admin_pb2.DownloadWeightsRequest(protocol_version=V, task_id=task_id),),
        ),
        # A live task's stream stays open until the task ends: the seed names no task, so a
        # well-formed case is NOT_FOUND rather than a stream the fuzzer would wait out.
        Rpc(
            admin + "WatchRounds",
            False,
            True,
            (admin_pb2.WatchRoundsRequest(protocol_version=V, task_id="no-such-task"),),
        ),
        Rpc(
            secagg + "Send",
            False,
            False,
            (
                secagg_pb2.SecAggClientMessage(
                    **envelope,  # type: ignore[arg-type]
                    advertise_keys=secagg_pb2.AdvertiseKeys(
                        keys=secagg_pb2.PairOfPublicKeys(
                            encryption_public_key=b"k" * 32, mask_public_key=b"m" * 32
                        )
                    ),
                ),
                secagg_pb2.SecAggClientMessage(
                    **envelope,  # type: ignore[arg-type]
                    abort=secagg_pb2.Abort(reason="fuzz"),
                ),
            ),
        ),
        Rpc(
            secagg + "SendMaskedInput",
            True,
            False,
            (masked_header,),
            (secagg_pb2.MaskedInputChunk(data=b"\0" * 4 * (num_parameters + 1)),),
        ),
        Rpc(
            secagg + "AwaitServerMessage",
            False,
            False,
            (
                secagg_pb2.AwaitServerMessageRequest(
                    **envelope,  # type: ignore[arg-type]
                    after_stage=secagg_pb2.ADVERTISE_KEYS,
                ),
                # A poll carrying the device's message of the stage (protos/secagg.proto).
                secagg_pb2.AwaitServerMessageRequest(
                    **envelope,  # type: ignore[arg-type]
                    after_stage=secagg_pb2.ADVERTISE_KEYS,
                    message=secagg_pb2.SecAggClientMessage(
                        **envelope,  # type: ignore[arg-type]
                        advertise_keys=secagg_pb2.AdvertiseKeys(
                            keys=secagg_pb2.PairOfPublicKeys(
                                encryption_public_key=b"k" * 32, mask_public_key=b"m" * 32
                            )
                        ),
                    ),
                ),
            ),
        ),
    ]


class RequestFuzzer:
    """Malformed requests from a seeded generator: the same seed, the same cases."""

    def __init__(self, rpcs: list[Rpc], seed: int) -> None:
        self._rpcs = rpcs
        self._rng = np.random.default_rng(seed)
        self._mutations: list[Callable[[message.Message], bytes]] = [
            self._random_bytes,
            self._truncated,
            self._bit_flipped,
            self._enum_out_of_range,
            self._oversized_field,
            self._appended_field,
            self._nested_garbage,
        ]

    def case(self) -> Case:
        rng = self._rng
        rpc = self._rpcs[int(rng.integers(len(self._rpcs)))]
        seed = rpc.seeds[int(rng.integers(len(rpc.seeds)))]
        broken = self._mutations[int(rng.integers(len(self._mutations)))](seed)
        if not rpc.streaming_in:
            return Case(rpc, [broken])
        tail = [m.SerializeToString() for m in rpc.tail]
        match int(rng.integers(3)):
            case 0:  # a broken first message
                messages = [broken, *tail]
            case 1:  # a valid first message, then a broken one
                messages = [seed.SerializeToString(), broken]
            case _:  # many tiny chunks, then garbage
                messages = [seed.SerializeToString()]
                messages += [self._random_bytes(seed) for _ in range(int(rng.integers(1, 20)))]
        return Case(rpc, messages)

    # ----- mutations -----------------------------------------------------------------------

    def _random_bytes(self, seed: message.Message) -> bytes:
        return self._rng.bytes(int(self._rng.integers(0, 300)))

    def _truncated(self, seed: message.Message) -> bytes:
        raw = seed.SerializeToString()
        return raw[: int(self._rng.integers(0, max(len(raw), 1)))]

    def _bit_flipped(self, seed: message.Message) -> bytes:
        raw = bytearray(seed.SerializeToString())
        for _ in range(int(self._rng.integers(1, 9))):
            if raw:
                at = int(self._rng.integers(len(raw)))
                raw[at] ^= 1 << int(self._rng.integers(8))
        return bytes(raw)

    def _enum_out_of_range(self, seed: message.Message) -> bytes:
        copy = type(seed)()
        copy.CopyFrom(seed)
        fields = _enum_fields(copy)
        if not fields:
            return self._appended_field(seed)
        owner, field = fields[int(self._rng.integers(len(fields)))]
        defined = set(field.enum_type.values_by_number)
        value = int(self._rng.integers(-(2**31), 2**31))
        while value in defined:
            value += 1
        setattr(owner, field.name, value)
        return copy.SerializeToString()

    def _oversized_field(self, seed: message.Message) -> bytes:
        copy = type(seed)()
        copy.CopyFrom(seed)
        fields = _scalar_fields(copy, (descriptor.FieldDescriptor.TYPE_STRING,))
        fields += _scalar_fields(copy, (descriptor.FieldDescriptor.TYPE_BYTES,))
        if not fields:
            return self._appended_field(seed)
        owner, field = fields[int(self._rng.integers(len(fields)))]
        size = int(self._rng.choice([129, 4097, 70_000, 300_000]))
        if field.type == descriptor.FieldDescriptor.TYPE_STRING:
            setattr(owner, field.name, "x" * size)
        else:
            setattr(owner, field.name, b"x" * size)
        return copy.SerializeToString()

    def _appended_field(self, seed: message.Message) -> bytes:
        """A field with a random number and wire type: varints of up to 10 bytes, lengths
        that claim more than follows, fixed-width values, group markers."""
        rng = self._rng
        number = int(rng.integers(1, 40))
        wire_type = int(rng.integers(0, 8))
        tag = _varint((number << 3) | wire_type)
        body = rng.bytes(int(rng.integers(0, 12)))
        if wire_type == 2:
            body = _varint(int(rng.integers(0, 2**40))) + body
        return seed.SerializeToString() + tag + body

    def _nested_garbage(self, seed: message.Message) -> bytes:
        """A length-delimited field (as a sub-message) whose content is garbage."""
        message_type = descriptor.FieldDescriptor.TYPE_MESSAGE
        fields = [f for f in seed.DESCRIPTOR.fields if f.type == message_type]
        if not fields:
            return self._bit_flipped(seed)
        field = fields[int(self._rng.integers(len(fields)))]
        garbage = self._rng.bytes(int(self._rng.integers(1, 64)))
        return (
            seed.SerializeToString()
            + _varint((field.number << 3) | 2)
            + _varint(len(garbage))
            + garbage
        )


def _enum_fields(msg: message.Message) -> list[tuple[message.Message, descriptor.FieldDescriptor]]:
    return _scalar_fields(msg, (descriptor.FieldDescriptor.TYPE_ENUM,))


def _scalar_fields(
    msg: message.Message, types: tuple[int, ...]
) -> list[tuple[message.Message, descriptor.FieldDescriptor]]:
    """Non-repeated fields of those types in the message and its set sub-messages."""
    found: list[tuple[message.Message, descriptor.FieldDescriptor]] = []
    for field in msg.DESCRIPTOR.fields:
        repeated = field.label == descriptor.FieldDescriptor.LABEL_REPEATED  # type: ignore[attr-defined]
        if repeated:
            continue
        if field.type in types:
            found.append((msg, field))
        elif field.type == descriptor.FieldDescriptor.TYPE_MESSAGE and msg.HasField(field.name):
            found += _scalar_fields(getattr(msg, field.name), types)
    return found


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


async def send(channel: grpc.aio.Channel, case: Case, timeout_s: float = 30.0) -> grpc.StatusCode:
    """Sends a case as raw bytes; the status code it ends with."""
    rpc = case.rpc
    try:
        if rpc.streaming_in:
            await channel.stream_unary(rpc.method)(iter(case.messages), timeout=timeout_s)
        elif rpc.streaming_out:
            async for _ in channel.unary_stream(rpc.method)(case.messages[0], timeout=timeout_s):
                pass
        else:
            await channel.unary_unary(rpc.method)(case.messages[0], timeout=timeout_s)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


@dataclasses.dataclass
class FuzzReport:
    sent: int = 0
    codes: collections.Counter[tuple[str, str]] = dataclasses.field(
        default_factory=collections.Counter
    )
    undocumented: list[tuple[str, str]] = dataclasses.field(default_factory=list)


async def fuzz(
    channel: grpc.aio.Channel, fuzzer: RequestFuzzer, count: int, concurrency: int = 64
) -> FuzzReport:
    """Sends `count` cases, `concurrency` at a time; tallies the codes per method."""
    documented = documented_codes()
    report = FuzzReport()
    for start in range(0, count, concurrency):
        cases = [fuzzer.case() for _ in range(min(concurrency, count - start))]
        codes = await asyncio.gather(*(send(channel, case) for case in cases))
        for case, code in zip(cases, codes, strict=True):
            method = case.rpc.method.rsplit("/", 1)[-1]
            report.codes[(method, code.name)] += 1
            if code not in documented[case.rpc.method] or code in (
                grpc.StatusCode.UNKNOWN,
                grpc.StatusCode.INTERNAL,
            ):
                report.undocumented.append((case.rpc.method, code.name))
        report.sent += len(cases)
    return report

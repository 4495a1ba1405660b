from protos import common_pb2 as _common_pb2
from protos import secagg_pb2 as _secagg_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EnrollRequest(_message.Message):
    __slots__ = ("protocol_version", "population", "public_key", "enrollment_secret", "attestation_chain", "signature")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    POPULATION_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    ENROLLMENT_SECRET_FIELD_NUMBER: _ClassVar[int]
    ATTESTATION_CHAIN_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    population: str
    public_key: bytes
    enrollment_secret: bytes
    attestation_chain: _containers.RepeatedScalarFieldContainer[bytes]
    signature: bytes
    def __init__(self, protocol_version: _Optional[int] = ..., population: _Optional[str] = ..., public_key: _Optional[bytes] = ..., enrollment_secret: _Optional[bytes] = ..., attestation_chain: _Optional[_Iterable[bytes]] = ..., signature: _Optional[bytes] = ...) -> None: ...

class EnrollResponse(_message.Message):
    __slots__ = ("device_id", "server_time_s")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    SERVER_TIME_S_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    server_time_s: float
    def __init__(self, device_id: _Optional[str] = ..., server_time_s: _Optional[float] = ...) -> None: ...

class CheckInRequest(_message.Message):
    __slots__ = ("protocol_version", "population", "device_id", "runtime_version", "example_count", "timestamp_ms", "nonce", "signature")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    POPULATION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_VERSION_FIELD_NUMBER: _ClassVar[int]
    EXAMPLE_COUNT_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    population: str
    device_id: str
    runtime_version: str
    example_count: int
    timestamp_ms: int
    nonce: bytes
    signature: bytes
    def __init__(self, protocol_version: _Optional[int] = ..., population: _Optional[str] = ..., device_id: _Optional[str] = ..., runtime_version: _Optional[str] = ..., example_count: _Optional[int] = ..., timestamp_ms: _Optional[int] = ..., nonce: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class Assignment(_message.Message):
    __slots__ = ("task_id", "round_number", "upload_token", "model", "weights", "plan", "report_deadline_s", "kind", "aggregation", "secure_aggregation")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        TRAINING: _ClassVar[Assignment.Kind]
        EVALUATION: _ClassVar[Assignment.Kind]
    TRAINING: Assignment.Kind
    EVALUATION: Assignment.Kind
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_NUMBER_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_TOKEN_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    REPORT_DEADLINE_S_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    SECURE_AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    round_number: int
    upload_token: bytes
    model: _common_pb2.ResourceRef
    weights: _common_pb2.ResourceRef
    plan: _common_pb2.Plan
    report_deadline_s: float
    kind: Assignment.Kind
    aggregation: AggregationSpec
    secure_aggregation: _secagg_pb2.SecAggSessionConfig
    def __init__(self, task_id: _Optional[str] = ..., round_number: _Optional[int] = ..., upload_token: _Optional[bytes] = ..., model: _Optional[_Union[_common_pb2.ResourceRef, _Mapping]] = ..., weights: _Optional[_Union[_common_pb2.ResourceRef, _Mapping]] = ..., plan: _Optional[_Union[_common_pb2.Plan, _Mapping]] = ..., report_deadline_s: _Optional[float] = ..., kind: _Optional[_Union[Assignment.Kind, str]] = ..., aggregation: _Optional[_Union[AggregationSpec, _Mapping]] = ..., secure_aggregation: _Optional[_Union[_secagg_pb2.SecAggSessionConfig, _Mapping]] = ...) -> None: ...

class AggregationSpec(_message.Message):
    __slots__ = ("encoding", "seed", "tensor_sizes", "zeroing", "clipping", "codec", "max_weight")
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TENSOR_SIZES_FIELD_NUMBER: _ClassVar[int]
    ZEROING_FIELD_NUMBER: _ClassVar[int]
    CLIPPING_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    MAX_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    encoding: str
    seed: int
    tensor_sizes: _containers.RepeatedScalarFieldContainer[int]
    zeroing: NormBound
    clipping: NormBound
    codec: CodecParams
    max_weight: float
    def __init__(self, encoding: _Optional[str] = ..., seed: _Optional[int] = ..., tensor_sizes: _Optional[_Iterable[int]] = ..., zeroing: _Optional[_Union[NormBound, _Mapping]] = ..., clipping: _Optional[_Union[NormBound, _Mapping]] = ..., codec: _Optional[_Union[CodecParams, _Mapping]] = ..., max_weight: _Optional[float] = ...) -> None: ...

class NormBound(_message.Message):
    __slots__ = ("bound", "norm_order", "estimate")
    BOUND_FIELD_NUMBER: _ClassVar[int]
    NORM_ORDER_FIELD_NUMBER: _ClassVar[int]
    ESTIMATE_FIELD_NUMBER: _ClassVar[int]
    bound: float
    norm_order: float
    estimate: float
    def __init__(self, bound: _Optional[float] = ..., norm_order: _Optional[float] = ..., estimate: _Optional[float] = ...) -> None: ...

class CodecParams(_message.Message):
    __slots__ = ("name", "bits", "threshold", "rotation", "keep_fraction", "top_k_fraction", "max_block_size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    BITS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    ROTATION_FIELD_NUMBER: _ClassVar[int]
    KEEP_FRACTION_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FRACTION_FIELD_NUMBER: _ClassVar[int]
    MAX_BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    bits: int
    threshold: int
    rotation: bool
    keep_fraction: float
    top_k_fraction: float
    max_block_size: int
    def __init__(self, name: _Optional[str] = ..., bits: _Optional[int] = ..., threshold: _Optional[int] = ..., rotation: bool = ..., keep_fraction: _Optional[float] = ..., top_k_fraction: _Optional[float] = ..., max_block_size: _Optional[int] = ...) -> None: ...

class Rejection(_message.Message):
    __slots__ = ("reason", "message")
    class Reason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        REASON_UNSPECIFIED: _ClassVar[Rejection.Reason]
        NO_TASK: _ClassVar[Rejection.Reason]
        ROUND_FULL: _ClassVar[Rejection.Reason]
        NOT_ELIGIBLE: _ClassVar[Rejection.Reason]
        TOO_EARLY: _ClassVar[Rejection.Reason]
        SHUTTING_DOWN: _ClassVar[Rejection.Reason]
    REASON_UNSPECIFIED: Rejection.Reason
    NO_TASK: Rejection.Reason
    ROUND_FULL: Rejection.Reason
    NOT_ELIGIBLE: Rejection.Reason
    TOO_EARLY: Rejection.Reason
    SHUTTING_DOWN: Rejection.Reason
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    reason: Rejection.Reason
    message: str
    def __init__(self, reason: _Optional[_Union[Rejection.Reason, str]] = ..., message: _Optional[str] = ...) -> None: ...

class CheckInResponse(_message.Message):
    __slots__ = ("assignment", "rejection", "retry_window")
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    REJECTION_FIELD_NUMBER: _ClassVar[int]
    RETRY_WINDOW_FIELD_NUMBER: _ClassVar[int]
    assignment: Assignment
    rejection: Rejection
    retry_window: _common_pb2.RetryWindow
    def __init__(self, assignment: _Optional[_Union[Assignment, _Mapping]] = ..., rejection: _Optional[_Union[Rejection, _Mapping]] = ..., retry_window: _Optional[_Union[_common_pb2.RetryWindow, _Mapping]] = ...) -> None: ...

class DownloadRequest(_message.Message):
    __slots__ = ("protocol_version", "sha256")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    sha256: str
    def __init__(self, protocol_version: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class DataChunk(_message.Message):
    __slots__ = ("data", "offset", "total_size")
    DATA_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    offset: int
    total_size: int
    def __init__(self, data: _Optional[bytes] = ..., offset: _Optional[int] = ..., total_size: _Optional[int] = ...) -> None: ...

class UploadHeader(_message.Message):
    __slots__ = ("protocol_version", "upload_token", "example_count", "num_elements", "encoding", "metrics", "device_signature")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXAMPLE_COUNT_FIELD_NUMBER: _ClassVar[int]
    NUM_ELEMENTS_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    upload_token: bytes
    example_count: int
    num_elements: int
    encoding: str
    metrics: _common_pb2.ClientMetrics
    device_signature: bytes
    def __init__(self, protocol_version: _Optional[int] = ..., upload_token: _Optional[bytes] = ..., example_count: _Optional[int] = ..., num_elements: _Optional[int] = ..., encoding: _Optional[str] = ..., metrics: _Optional[_Union[_common_pb2.ClientMetrics, _Mapping]] = ..., device_signature: _Optional[bytes] = ...) -> None: ...

class UploadChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: UploadHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[UploadHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class UploadResponse(_message.Message):
    __slots__ = ("retry_window",)
    RETRY_WINDOW_FIELD_NUMBER: _ClassVar[int]
    retry_window: _common_pb2.RetryWindow
    def __init__(self, retry_window: _Optional[_Union[_common_pb2.RetryWindow, _Mapping]] = ...) -> None: ...

class FailureReport(_message.Message):
    __slots__ = ("protocol_version", "upload_token", "cause", "message", "device_signature")
    class Cause(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        CAUSE_UNSPECIFIED: _ClassVar[FailureReport.Cause]
        INTERRUPTED: _ClassVar[FailureReport.Cause]
        TRAINING_ERROR: _ClassVar[FailureReport.Cause]
        DOWNLOAD_ERROR: _ClassVar[FailureReport.Cause]
        MODEL_REJECTED: _ClassVar[FailureReport.Cause]
        SECURE_AGGREGATION_ERROR: _ClassVar[FailureReport.Cause]
    CAUSE_UNSPECIFIED: FailureReport.Cause
    INTERRUPTED: FailureReport.Cause
    TRAINING_ERROR: FailureReport.Cause
    DOWNLOAD_ERROR: FailureReport.Cause
    MODEL_REJECTED: FailureReport.Cause
    SECURE_AGGREGATION_ERROR: FailureReport.Cause
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CAUSE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    upload_token: bytes
    cause: FailureReport.Cause
    message: str
    device_signature: bytes
    def __init__(self, protocol_version: _Optional[int] = ..., upload_token: _Optional[bytes] = ..., cause: _Optional[_Union[FailureReport.Cause, str]] = ..., message: _Optional[str] = ..., device_signature: _Optional[bytes] = ...) -> None: ...

class FailureAck(_message.Message):
    __slots__ = ("retry_window",)
    RETRY_WINDOW_FIELD_NUMBER: _ClassVar[int]
    retry_window: _common_pb2.RetryWindow
    def __init__(self, retry_window: _Optional[_Union[_common_pb2.RetryWindow, _Mapping]] = ...) -> None: ...

from protos import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetClusterRequest(_message.Message):
    __slots__ = ("protocol_version",)
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    def __init__(self, protocol_version: _Optional[int] = ...) -> None: ...

class Cluster(_message.Message):
    __slots__ = ("replicas", "leases", "counts")
    class Replica(_message.Message):
        __slots__ = ("name", "host", "pid", "seen_s_ago", "check_ins", "uploads", "answering", "address", "forwarded")
        NAME_FIELD_NUMBER: _ClassVar[int]
        HOST_FIELD_NUMBER: _ClassVar[int]
        PID_FIELD_NUMBER: _ClassVar[int]
        SEEN_S_AGO_FIELD_NUMBER: _ClassVar[int]
        CHECK_INS_FIELD_NUMBER: _ClassVar[int]
        UPLOADS_FIELD_NUMBER: _ClassVar[int]
        ANSWERING_FIELD_NUMBER: _ClassVar[int]
        ADDRESS_FIELD_NUMBER: _ClassVar[int]
        FORWARDED_FIELD_NUMBER: _ClassVar[int]
        name: str
        host: str
        pid: int
        seen_s_ago: float
        check_ins: int
        uploads: int
        answering: bool
        address: str
        forwarded: int
        def __init__(self, name: _Optional[str] = ..., host: _Optional[str] = ..., pid: _Optional[int] = ..., seen_s_ago: _Optional[float] = ..., check_ins: _Optional[int] = ..., uploads: _Optional[int] = ..., answering: bool = ..., address: _Optional[str] = ..., forwarded: _Optional[int] = ...) -> None: ...
    class TaskLease(_message.Message):
        __slots__ = ("task_id", "leader", "epoch", "expires_in_s")
        TASK_ID_FIELD_NUMBER: _ClassVar[int]
        LEADER_FIELD_NUMBER: _ClassVar[int]
        EPOCH_FIELD_NUMBER: _ClassVar[int]
        EXPIRES_IN_S_FIELD_NUMBER: _ClassVar[int]
        task_id: str
        leader: str
        epoch: int
        expires_in_s: float
        def __init__(self, task_id: _Optional[str] = ..., leader: _Optional[str] = ..., epoch: _Optional[int] = ..., expires_in_s: _Optional[float] = ...) -> None: ...
    class ReplicaTaskCounts(_message.Message):
        __slots__ = ("replica", "task_id", "selected", "reported")
        REPLICA_FIELD_NUMBER: _ClassVar[int]
        TASK_ID_FIELD_NUMBER: _ClassVar[int]
        SELECTED_FIELD_NUMBER: _ClassVar[int]
        REPORTED_FIELD_NUMBER: _ClassVar[int]
        replica: str
        task_id: str
        selected: int
        reported: int
        def __init__(self, replica: _Optional[str] = ..., task_id: _Optional[str] = ..., selected: _Optional[int] = ..., reported: _Optional[int] = ...) -> None: ...
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    LEASES_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    replicas: _containers.RepeatedCompositeFieldContainer[Cluster.Replica]
    leases: _containers.RepeatedCompositeFieldContainer[Cluster.TaskLease]
    counts: _containers.RepeatedCompositeFieldContainer[Cluster.ReplicaTaskCounts]
    def __init__(self, replicas: _Optional[_Iterable[_Union[Cluster.Replica, _Mapping]]] = ..., leases: _Optional[_Iterable[_Union[Cluster.TaskLease, _Mapping]]] = ..., counts: _Optional[_Iterable[_Union[Cluster.ReplicaTaskCounts, _Mapping]]] = ...) -> None: ...

class DownloadWeightsRequest(_message.Message):
    __slots__ = ("protocol_version", "task_id")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    task_id: str
    def __init__(self, protocol_version: _Optional[int] = ..., task_id: _Optional[str] = ...) -> None: ...

class WeightsChunk(_message.Message):
    __slots__ = ("committed_rounds", "sha256", "data", "offset", "total_size")
    COMMITTED_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    committed_rounds: int
    sha256: str
    data: bytes
    offset: int
    total_size: int
    def __init__(self, committed_rounds: _Optional[int] = ..., sha256: _Optional[str] = ..., data: _Optional[bytes] = ..., offset: _Optional[int] = ..., total_size: _Optional[int] = ...) -> None: ...

class WatchRoundsRequest(_message.Message):
    __slots__ = ("protocol_version", "task_id", "after_round")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_ROUND_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    task_id: str
    after_round: int
    def __init__(self, protocol_version: _Optional[int] = ..., task_id: _Optional[str] = ..., after_round: _Optional[int] = ...) -> None: ...

class PauseTaskRequest(_message.Message):
    __slots__ = ("protocol_version", "task_id")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    task_id: str
    def __init__(self, protocol_version: _Optional[int] = ..., task_id: _Optional[str] = ...) -> None: ...

class ResumeTaskRequest(_message.Message):
    __slots__ = ("protocol_version", "task_id")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    task_id: str
    def __init__(self, protocol_version: _Optional[int] = ..., task_id: _Optional[str] = ...) -> None: ...

class CancelTaskRequest(_message.Message):
    __slots__ = ("protocol_version", "task_id")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    task_id: str
    def __init__(self, protocol_version: _Optional[int] = ..., task_id: _Optional[str] = ...) -> None: ...

class ListTasksRequest(_message.Message):
    __slots__ = ("protocol_version",)
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    def __init__(self, protocol_version: _Optional[int] = ...) -> None: ...

class ListTasksResponse(_message.Message):
    __slots__ = ("tasks",)
    TASKS_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[TaskStatus]
    def __init__(self, tasks: _Optional[_Iterable[_Union[TaskStatus, _Mapping]]] = ...) -> None: ...

class TaskConfig(_message.Message):
    __slots__ = ("task_id", "population", "total_rounds", "target_reports", "over_selection", "min_reports", "selection_deadline_s", "reporting_deadline_s", "plan", "server_learning_rate", "max_concurrent_rounds", "server_optimizer", "eligibility", "kind", "evaluates", "aggregator", "max_network_share", "max_examples_per_device")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    POPULATION_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    TARGET_REPORTS_FIELD_NUMBER: _ClassVar[int]
    OVER_SELECTION_FIELD_NUMBER: _ClassVar[int]
    MIN_REPORTS_FIELD_NUMBER: _ClassVar[int]
    SELECTION_DEADLINE_S_FIELD_NUMBER: _ClassVar[int]
    REPORTING_DEADLINE_S_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    SERVER_LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    SERVER_OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    ELIGIBILITY_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    EVALUATES_FIELD_NUMBER: _ClassVar[int]
    AGGREGATOR_FIELD_NUMBER: _ClassVar[int]
    MAX_NETWORK_SHARE_FIELD_NUMBER: _ClassVar[int]
    MAX_EXAMPLES_PER_DEVICE_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    population: str
    total_rounds: int
    target_reports: int
    over_selection: float
    min_reports: int
    selection_deadline_s: float
    reporting_deadline_s: float
    plan: _common_pb2.Plan
    server_learning_rate: float
    max_concurrent_rounds: int
    server_optimizer: ServerOptimizer
    eligibility: Eligibility
    kind: str
    evaluates: str
    aggregator: str
    max_network_share: float
    max_examples_per_device: int
    def __init__(self, task_id: _Optional[str] = ..., population: _Optional[str] = ..., total_rounds: _Optional[int] = ..., target_reports: _Optional[int] = ..., over_selection: _Optional[float] = ..., min_reports: _Optional[int] = ..., selection_deadline_s: _Optional[float] = ..., reporting_deadline_s: _Optional[float] = ..., plan: _Optional[_Union[_common_pb2.Plan, _Mapping]] = ..., server_learning_rate: _Optional[float] = ..., max_concurrent_rounds: _Optional[int] = ..., server_optimizer: _Optional[_Union[ServerOptimizer, _Mapping]] = ..., eligibility: _Optional[_Union[Eligibility, _Mapping]] = ..., kind: _Optional[str] = ..., evaluates: _Optional[str] = ..., aggregator: _Optional[str] = ..., max_network_share: _Optional[float] = ..., max_examples_per_device: _Optional[int] = ...) -> None: ...

class ServerOptimizer(_message.Message):
    __slots__ = ("name", "momentum", "beta_1", "beta_2", "epsilon", "initial_preconditioner")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    BETA_1_FIELD_NUMBER: _ClassVar[int]
    BETA_2_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    INITIAL_PRECONDITIONER_FIELD_NUMBER: _ClassVar[int]
    name: str
    momentum: float
    beta_1: float
    beta_2: float
    epsilon: float
    initial_preconditioner: float
    def __init__(self, name: _Optional[str] = ..., momentum: _Optional[float] = ..., beta_1: _Optional[float] = ..., beta_2: _Optional[float] = ..., epsilon: _Optional[float] = ..., initial_preconditioner: _Optional[float] = ...) -> None: ...

class Eligibility(_message.Message):
    __slots__ = ("min_examples", "min_separation_s", "min_runtime_version")
    MIN_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    MIN_SEPARATION_S_FIELD_NUMBER: _ClassVar[int]
    MIN_RUNTIME_VERSION_FIELD_NUMBER: _ClassVar[int]
    min_examples: int
    min_separation_s: float
    min_runtime_version: str
    def __init__(self, min_examples: _Optional[int] = ..., min_separation_s: _Optional[float] = ..., min_runtime_version: _Optional[str] = ...) -> None: ...

class RegisterTaskRequest(_message.Message):
    __slots__ = ("protocol_version", "config", "model_tflite", "initial_weights")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    MODEL_TFLITE_FIELD_NUMBER: _ClassVar[int]
    INITIAL_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    config: TaskConfig
    model_tflite: bytes
    initial_weights: bytes
    def __init__(self, protocol_version: _Optional[int] = ..., config: _Optional[_Union[TaskConfig, _Mapping]] = ..., model_tflite: _Optional[bytes] = ..., initial_weights: _Optional[bytes] = ...) -> None: ...

class RegisterTaskResponse(_message.Message):
    __slots__ = ("task_id", "model_sha256", "num_parameters")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    NUM_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    model_sha256: str
    num_parameters: int
    def __init__(self, task_id: _Optional[str] = ..., model_sha256: _Optional[str] = ..., num_parameters: _Optional[int] = ...) -> None: ...

class GetTaskStatusRequest(_message.Message):
    __slots__ = ("protocol_version", "task_id")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    task_id: str
    def __init__(self, protocol_version: _Optional[int] = ..., task_id: _Optional[str] = ...) -> None: ...

class RoundSummary(_message.Message):
    __slots__ = ("round_number", "state", "selected", "reported", "dropped", "metrics", "started_at", "finished_at")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ROUND_NUMBER_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SELECTED_FIELD_NUMBER: _ClassVar[int]
    REPORTED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    round_number: int
    state: str
    selected: int
    reported: int
    dropped: int
    metrics: _containers.ScalarMap[str, float]
    started_at: float
    finished_at: float
    def __init__(self, round_number: _Optional[int] = ..., state: _Optional[str] = ..., selected: _Optional[int] = ..., reported: _Optional[int] = ..., dropped: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., started_at: _Optional[float] = ..., finished_at: _Optional[float] = ...) -> None: ...

class TaskStatus(_message.Message):
    __slots__ = ("config", "state", "committed_rounds", "model_sha256", "num_parameters", "current_round")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    NUM_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_ROUND_FIELD_NUMBER: _ClassVar[int]
    config: TaskConfig
    state: str
    committed_rounds: int
    model_sha256: str
    num_parameters: int
    current_round: RoundSummary
    def __init__(self, config: _Optional[_Union[TaskConfig, _Mapping]] = ..., state: _Optional[str] = ..., committed_rounds: _Optional[int] = ..., model_sha256: _Optional[str] = ..., num_parameters: _Optional[int] = ..., current_round: _Optional[_Union[RoundSummary, _Mapping]] = ...) -> None: ...

class ListRoundsRequest(_message.Message):
    __slots__ = ("protocol_version", "task_id")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    task_id: str
    def __init__(self, protocol_version: _Optional[int] = ..., task_id: _Optional[str] = ...) -> None: ...

class ListRoundsResponse(_message.Message):
    __slots__ = ("rounds",)
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    rounds: _containers.RepeatedCompositeFieldContainer[RoundSummary]
    def __init__(self, rounds: _Optional[_Iterable[_Union[RoundSummary, _Mapping]]] = ...) -> None: ...

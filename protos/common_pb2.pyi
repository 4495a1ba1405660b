from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class RetryWindow(_message.Message):
    __slots__ = ("min_delay_s", "max_delay_s")
    MIN_DELAY_S_FIELD_NUMBER: _ClassVar[int]
    MAX_DELAY_S_FIELD_NUMBER: _ClassVar[int]
    min_delay_s: float
    max_delay_s: float
    def __init__(self, min_delay_s: _Optional[float] = ..., max_delay_s: _Optional[float] = ...) -> None: ...

class ResourceRef(_message.Message):
    __slots__ = ("sha256", "size_bytes", "kind")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    size_bytes: int
    kind: str
    def __init__(self, sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ..., kind: _Optional[str] = ...) -> None: ...

class Plan(_message.Message):
    __slots__ = ("epochs", "batch_size", "max_examples", "fedprox_mu", "keep_order", "dropout_seed")
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    FEDPROX_MU_FIELD_NUMBER: _ClassVar[int]
    KEEP_ORDER_FIELD_NUMBER: _ClassVar[int]
    DROPOUT_SEED_FIELD_NUMBER: _ClassVar[int]
    epochs: int
    batch_size: int
    max_examples: int
    fedprox_mu: float
    keep_order: bool
    dropout_seed: int
    def __init__(self, epochs: _Optional[int] = ..., batch_size: _Optional[int] = ..., max_examples: _Optional[int] = ..., fedprox_mu: _Optional[float] = ..., keep_order: bool = ..., dropout_seed: _Optional[int] = ...) -> None: ...

class ClientMetrics(_message.Message):
    __slots__ = ("loss", "accuracy", "num_examples", "num_batches")
    LOSS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    NUM_BATCHES_FIELD_NUMBER: _ClassVar[int]
    loss: float
    accuracy: float
    num_examples: int
    num_batches: int
    def __init__(self, loss: _Optional[float] = ..., accuracy: _Optional[float] = ..., num_examples: _Optional[int] = ..., num_batches: _Optional[int] = ...) -> None: ...

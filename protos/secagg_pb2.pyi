from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SecAggStage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STAGE_UNSPECIFIED: _ClassVar[SecAggStage]
    ADVERTISE_KEYS: _ClassVar[SecAggStage]
    SHARE_KEYS: _ClassVar[SecAggStage]
    MASKED_INPUT_COLLECTION: _ClassVar[SecAggStage]
    UNMASKING: _ClassVar[SecAggStage]
    COMPLETED: _ClassVar[SecAggStage]
    ABORTED: _ClassVar[SecAggStage]
STAGE_UNSPECIFIED: SecAggStage
ADVERTISE_KEYS: SecAggStage
SHARE_KEYS: SecAggStage
MASKED_INPUT_COLLECTION: SecAggStage
UNMASKING: SecAggStage
COMPLETED: SecAggStage
ABORTED: SecAggStage

class SecAggSessionConfig(_message.Message):
    __slots__ = ("session_id", "client_id", "num_clients", "num_neighbours", "threshold", "graph_seed", "modulus_bits", "vector_length", "session_token")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_CLIENTS_FIELD_NUMBER: _ClassVar[int]
    NUM_NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    GRAPH_SEED_FIELD_NUMBER: _ClassVar[int]
    MODULUS_BITS_FIELD_NUMBER: _ClassVar[int]
    VECTOR_LENGTH_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    session_id: bytes
    client_id: int
    num_clients: int
    num_neighbours: int
    threshold: int
    graph_seed: bytes
    modulus_bits: int
    vector_length: int
    session_token: bytes
    def __init__(self, session_id: _Optional[bytes] = ..., client_id: _Optional[int] = ..., num_clients: _Optional[int] = ..., num_neighbours: _Optional[int] = ..., threshold: _Optional[int] = ..., graph_seed: _Optional[bytes] = ..., modulus_bits: _Optional[int] = ..., vector_length: _Optional[int] = ..., session_token: _Optional[bytes] = ...) -> None: ...

class PairOfPublicKeys(_message.Message):
    __slots__ = ("encryption_public_key", "mask_public_key")
    ENCRYPTION_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    MASK_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    encryption_public_key: bytes
    mask_public_key: bytes
    def __init__(self, encryption_public_key: _Optional[bytes] = ..., mask_public_key: _Optional[bytes] = ...) -> None: ...

class AdvertiseKeys(_message.Message):
    __slots__ = ("keys", "signature")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    keys: PairOfPublicKeys
    signature: bytes
    def __init__(self, keys: _Optional[_Union[PairOfPublicKeys, _Mapping]] = ..., signature: _Optional[bytes] = ...) -> None: ...

class EncryptedKeyShares(_message.Message):
    __slots__ = ("recipient_id", "sender_id", "ciphertext")
    RECIPIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SENDER_ID_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    recipient_id: int
    sender_id: int
    ciphertext: bytes
    def __init__(self, recipient_id: _Optional[int] = ..., sender_id: _Optional[int] = ..., ciphertext: _Optional[bytes] = ...) -> None: ...

class ShareKeys(_message.Message):
    __slots__ = ("shares",)
    SHARES_FIELD_NUMBER: _ClassVar[int]
    shares: _containers.RepeatedCompositeFieldContainer[EncryptedKeyShares]
    def __init__(self, shares: _Optional[_Iterable[_Union[EncryptedKeyShares, _Mapping]]] = ...) -> None: ...

class SecretShare(_message.Message):
    __slots__ = ("owner_id", "value")
    OWNER_ID_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    owner_id: int
    value: bytes
    def __init__(self, owner_id: _Optional[int] = ..., value: _Optional[bytes] = ...) -> None: ...

class UnmaskingResponse(_message.Message):
    __slots__ = ("self_mask_seed_shares", "mask_key_shares")
    SELF_MASK_SEED_SHARES_FIELD_NUMBER: _ClassVar[int]
    MASK_KEY_SHARES_FIELD_NUMBER: _ClassVar[int]
    self_mask_seed_shares: _containers.RepeatedCompositeFieldContainer[SecretShare]
    mask_key_shares: _containers.RepeatedCompositeFieldContainer[SecretShare]
    def __init__(self, self_mask_seed_shares: _Optional[_Iterable[_Union[SecretShare, _Mapping]]] = ..., mask_key_shares: _Optional[_Iterable[_Union[SecretShare, _Mapping]]] = ...) -> None: ...

class Abort(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class SecAggClientMessage(_message.Message):
    __slots__ = ("protocol_version", "session_id", "client_id", "session_token", "advertise_keys", "share_keys", "unmasking_response", "abort")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ADVERTISE_KEYS_FIELD_NUMBER: _ClassVar[int]
    SHARE_KEYS_FIELD_NUMBER: _ClassVar[int]
    UNMASKING_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ABORT_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    session_id: bytes
    client_id: int
    session_token: bytes
    advertise_keys: AdvertiseKeys
    share_keys: ShareKeys
    unmasking_response: UnmaskingResponse
    abort: Abort
    def __init__(self, protocol_version: _Optional[int] = ..., session_id: _Optional[bytes] = ..., client_id: _Optional[int] = ..., session_token: _Optional[bytes] = ..., advertise_keys: _Optional[_Union[AdvertiseKeys, _Mapping]] = ..., share_keys: _Optional[_Union[ShareKeys, _Mapping]] = ..., unmasking_response: _Optional[_Union[UnmaskingResponse, _Mapping]] = ..., abort: _Optional[_Union[Abort, _Mapping]] = ...) -> None: ...

class MaskedInputHeader(_message.Message):
    __slots__ = ("protocol_version", "session_id", "client_id", "session_token", "vector_length")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    VECTOR_LENGTH_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    session_id: bytes
    client_id: int
    session_token: bytes
    vector_length: int
    def __init__(self, protocol_version: _Optional[int] = ..., session_id: _Optional[bytes] = ..., client_id: _Optional[int] = ..., session_token: _Optional[bytes] = ..., vector_length: _Optional[int] = ...) -> None: ...

class MaskedInputChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: MaskedInputHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[MaskedInputHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class SecAggAck(_message.Message):
    __slots__ = ("stage",)
    STAGE_FIELD_NUMBER: _ClassVar[int]
    stage: SecAggStage
    def __init__(self, stage: _Optional[_Union[SecAggStage, str]] = ...) -> None: ...

class AwaitServerMessageRequest(_message.Message):
    __slots__ = ("protocol_version", "session_id", "client_id", "session_token", "after_stage", "message")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    AFTER_STAGE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    session_id: bytes
    client_id: int
    session_token: bytes
    after_stage: SecAggStage
    message: SecAggClientMessage
    def __init__(self, protocol_version: _Optional[int] = ..., session_id: _Optional[bytes] = ..., client_id: _Optional[int] = ..., session_token: _Optional[bytes] = ..., after_stage: _Optional[_Union[SecAggStage, str]] = ..., message: _Optional[_Union[SecAggClientMessage, _Mapping]] = ...) -> None: ...

class NeighbourKeys(_message.Message):
    __slots__ = ("client_id", "keys", "device_public_key", "signature")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    client_id: int
    keys: PairOfPublicKeys
    device_public_key: bytes
    signature: bytes
    def __init__(self, client_id: _Optional[int] = ..., keys: _Optional[_Union[PairOfPublicKeys, _Mapping]] = ..., device_public_key: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class ShareKeysRequest(_message.Message):
    __slots__ = ("neighbours", "session_config")
    NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    SESSION_CONFIG_FIELD_NUMBER: _ClassVar[int]
    neighbours: _containers.RepeatedCompositeFieldContainer[NeighbourKeys]
    session_config: SecAggSessionConfig
    def __init__(self, neighbours: _Optional[_Iterable[_Union[NeighbourKeys, _Mapping]]] = ..., session_config: _Optional[_Union[SecAggSessionConfig, _Mapping]] = ...) -> None: ...

class MaskedInputRequest(_message.Message):
    __slots__ = ("shares",)
    SHARES_FIELD_NUMBER: _ClassVar[int]
    shares: _containers.RepeatedCompositeFieldContainer[EncryptedKeyShares]
    def __init__(self, shares: _Optional[_Iterable[_Union[EncryptedKeyShares, _Mapping]]] = ...) -> None: ...

class UnmaskingRequest(_message.Message):
    __slots__ = ("dropped_ids", "survivor_ids")
    DROPPED_IDS_FIELD_NUMBER: _ClassVar[int]
    SURVIVOR_IDS_FIELD_NUMBER: _ClassVar[int]
    dropped_ids: _containers.RepeatedScalarFieldContainer[int]
    survivor_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, dropped_ids: _Optional[_Iterable[int]] = ..., survivor_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class SessionResult(_message.Message):
    __slots__ = ("num_summed",)
    NUM_SUMMED_FIELD_NUMBER: _ClassVar[int]
    num_summed: int
    def __init__(self, num_summed: _Optional[int] = ...) -> None: ...

class SecAggServerMessage(_message.Message):
    __slots__ = ("share_keys_request", "masked_input_request", "unmasking_request", "result", "abort", "session_config")
    SHARE_KEYS_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MASKED_INPUT_REQUEST_FIELD_NUMBER: _ClassVar[int]
    UNMASKING_REQUEST_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ABORT_FIELD_NUMBER: _ClassVar[int]
    SESSION_CONFIG_FIELD_NUMBER: _ClassVar[int]
    share_keys_request: ShareKeysRequest
    masked_input_request: MaskedInputRequest
    unmasking_request: UnmaskingRequest
    result: SessionResult
    abort: Abort
    session_config: SecAggSessionConfig
    def __init__(self, share_keys_request: _Optional[_Union[ShareKeysRequest, _Mapping]] = ..., masked_input_request: _Optional[_Union[MaskedInputRequest, _Mapping]] = ..., unmasking_request: _Optional[_Union[UnmaskingRequest, _Mapping]] = ..., result: _Optional[_Union[SessionResult, _Mapping]] = ..., abort: _Optional[_Union[Abort, _Mapping]] = ..., session_config: _Optional[_Union[SecAggSessionConfig, _Mapping]] = ...) -> None: ...

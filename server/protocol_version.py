"""The one protocol version this coordinator speaks; every device message names its own."""

from __future__ import annotations

from device_runtime import constants as protocol
from server.errors import FailedPrecondition


def check_protocol_version(version: int) -> None:
    if version != protocol.PROTOCOL_VERSION:
        raise FailedPrecondition(
            f"protocol version {version} is not supported; this coordinator speaks "
            f"{protocol.PROTOCOL_VERSION}"
        )

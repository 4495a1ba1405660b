"""How a client reaches the coordinator: the one place channels are made, TLS by default.

Devices, the emulator and the operator's commands all open their channels here, so the
choice between verified TLS and plaintext is made once, explicitly, by the caller's
`ServerTrust`. Plaintext exists only for a caller that asks for it (`--insecure`).
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import ssl
from collections.abc import Sequence

import grpc

ChannelOptions = Sequence[tuple[str, int | str]]


@dataclasses.dataclass(frozen=True)
class ServerTrust:
    """Which coordinator certificates a client accepts. Picklable: it crosses into the
    emulator's worker processes.

    `root_certificates` (PEM) are the certificate authorities that may sign the coordinator's
    certificate; None means the system trust store. `insecure` drops TLS altogether: the
    channel is plaintext and anyone on the path can read and change every message.
    """

    root_certificates: bytes | None = None
    insecure: bool = False

    @classmethod
    def from_files(cls, root_certs: str | pathlib.Path | None, insecure: bool) -> ServerTrust:
        """What `--root-certs PEM` and `--insecure` mean on every command."""
        if insecure and root_certs:
            raise ValueError("--insecure and --root-certs exclude each other")
        if insecure:
            return cls(insecure=True)
        return cls(pathlib.Path(root_certs).read_bytes() if root_certs else None)

    def credentials(self) -> grpc.ChannelCredentials | None:
        """gRPC channel credentials, or None for a plaintext channel."""
        if self.insecure:
            return None
        roots = self.root_certificates or system_root_certificates()
        return grpc.ssl_channel_credentials(root_certificates=roots)


def insecure_warning(command: str) -> str:
    """The line every command prints to stderr when it starts with --insecure."""
    return (
        f"WARNING: {command} runs without TLS (--insecure): anyone on the network path can "
        "read and change its traffic"
    )


@functools.cache
def system_root_certificates() -> bytes | None:
    """The operating system's CA bundle (as OpenSSL finds it), or None to use the roots
    bundled with gRPC where the system has no bundle file."""
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile):
        if candidate and pathlib.Path(candidate).is_file():
            return pathlib.Path(candidate).read_bytes()
    return None


def open_channel(target: str, trust: ServerTrust, options: ChannelOptions = ()) -> grpc.aio.Channel:
    """An asyncio channel to `target` (host:port), verified TLS unless `trust.insecure`."""
    credentials = trust.credentials()
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=list(options))
    return grpc.aio.secure_channel(target, credentials, options=list(options))


def open_blocking_channel(
    target: str, trust: ServerTrust, options: ChannelOptions = ()
) -> grpc.Channel:
    """The same as `open_channel`, for synchronous callers (command-line tools)."""
    credentials = trust.credentials()
    if credentials is None:
        return grpc.insecure_channel(target, options=list(options))
    return grpc.secure_channel(target, credentials, options=list(options))

"""How a client reaches the coordinators: the one place channels are made, TLS by default.

Devices, the emulator and the operator's commands all open their channels here, so the
choice between verified TLS and plaintext is made once, explicitly, by the caller's
`ServerTrust`. Plaintext exists only for a caller that asks for it (`--insecure`).

A target may name several coordinators (device_runtime/coordinator_addresses.py). The channel
balances over them with gRPC's `round_robin` policy, which sends each call to the next
address whose connection is up, so calls stop going to a coordinator the moment its
connection drops. A device call that fails UNAVAILABLE (a coordinator died under it, or
answered that it cannot serve now) is retried by gRPC's retry policy on the next address;
only when every attempt failed does the caller see UNAVAILABLE, and then with the last
coordinator's `retry-after-s` metadata.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import ssl
from collections.abc import Sequence

import grpc

from device_runtime import constants
from device_runtime.coordinator_addresses import CoordinatorAddresses

ChannelOptions = Sequence[tuple[str, int | str]]


@dataclasses.dataclass(frozen=True)
class ServerTrust:
    """Which coordinator certificates a client accepts. Picklable: it crosses into the
    emulator's worker processes.

    `root_certificates` (PEM) are the certificate authorities that may sign the coordinator's
    certificate; None means the system trust store. `server_name` is the name the certificate
    must carry when it is not the host in the target (several coordinators at different IP
    addresses behind one name). `insecure` drops TLS altogether: the channel is plaintext and
    anyone on the path can read and change every message.
    """

    root_certificates: bytes | None = None
    insecure: bool = False
    server_name: str | None = None

    @classmethod
    def from_files(
        cls,
        root_certs: str | pathlib.Path | None,
        insecure: bool,
        server_name: str | None = None,
    ) -> ServerTrust:
        """What `--root-certs PEM`, `--insecure` and `--server-name` mean on every command."""
        if insecure and root_certs:
            raise ValueError("--insecure and --root-certs exclude each other")
        if insecure and server_name:
            raise ValueError("--insecure and --server-name exclude each other: no certificate")
        if insecure:
            return cls(insecure=True)
        roots = pathlib.Path(root_certs).read_bytes() if root_certs else None
        return cls(roots, server_name=server_name)

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


def service_config() -> str:
    """The channel's gRPC service config (JSON): round_robin over the resolved addresses, and
    device calls retried on UNAVAILABLE. Each retry is a new pick, so it goes to the next
    coordinator. Retrying is safe for every device method: Enroll and Download are
    idempotent; a replayed CheckIn nonce is refused UNAUTHENTICATED (the runtime enrolls and
    checks in afresh); an upload or failure report whose first attempt landed is answered
    ALREADY_EXISTS or FAILED_PRECONDITION, which the runtime reads as done (runtime.py)."""
    return json.dumps(
        {
            "loadBalancingConfig": [{"round_robin": {}}],
            "methodConfig": [
                {
                    "name": [{"service": constants.DEVICE_SERVICE}],
                    "retryPolicy": {
                        "maxAttempts": constants.failover_attempts,
                        "initialBackoff": f"{constants.failover_backoff_min_s}s",
                        "maxBackoff": f"{constants.failover_backoff_max_s}s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            ],
        }
    )


def keepalive_options() -> list[tuple[str, int]]:
    """Pings while a call is in flight (device_runtime/constants.py): a coordinator that
    hangs fails the call UNAVAILABLE before its deadline. Replicas forwarding to each other
    use them too (server/replica_forwarder.py)."""
    return [
        ("grpc.keepalive_time_ms", int(1000 * constants.keepalive_time_s)),
        ("grpc.keepalive_timeout_ms", int(1000 * constants.keepalive_timeout_s)),
        # Every ping's answer is awaited this long, not only keepalive's: gRPC's own bandwidth
        # probe pings would otherwise wait 60 s for theirs, and hold the keepalive ping back.
        ("grpc.http2.ping_timeout_ms", int(1000 * constants.keepalive_timeout_s)),
        # Pings are not tied to the caller sending data: a long poll only receives.
        ("grpc.http2.max_pings_without_data", 0),
    ]


def target_and_options(
    target: str, trust: ServerTrust, options: ChannelOptions = ()
) -> tuple[str, list[tuple[str, int | str]]]:
    """The gRPC target URI for `target` (see coordinator_addresses) and the channel options
    that balance, retry and check the certificate's name. Raises AddressError (a ValueError)
    for a target it cannot dial."""
    addresses = CoordinatorAddresses.parse(target, trust.server_name)
    all_options: list[tuple[str, int | str]] = [
        ("grpc.service_config", service_config()),
        # The DNS resolver must not swap our policy for one published in a TXT record.
        ("grpc.service_config_disable_resolution", 1),
        ("grpc.enable_retries", 1),
        # gRPC replays a call only while it holds every message it sent; an upload up to
        # this size can be replayed against another coordinator.
        ("grpc.per_rpc_retry_buffer_size", constants.failover_buffer_bytes),
        *keepalive_options(),
    ]
    if not trust.insecure:
        name = addresses.require_certificate_name()
        # The certificate must carry this name whichever address answered: TLS checks it
        # against every coordinator, and SNI asks each for it.
        all_options.append(("grpc.ssl_target_name_override", name))
        if len(addresses.endpoints) > 1:
            all_options.append(("grpc.default_authority", name))
    # gRPC takes the first of a repeated option: the caller's come first, and win.
    return addresses.target, [*options, *all_options]


def open_channel(target: str, trust: ServerTrust, options: ChannelOptions = ()) -> grpc.aio.Channel:
    """An asyncio channel to the coordinator(s) `target` names (`host:port`, or several IP
    addresses: see coordinator_addresses), verified TLS unless `trust.insecure`. Raises
    AddressError (a ValueError) for a target it cannot dial."""
    uri, all_options = target_and_options(target, trust, options)
    credentials = trust.credentials()
    if credentials is None:
        return grpc.aio.insecure_channel(uri, options=all_options)
    return grpc.aio.secure_channel(uri, credentials, options=all_options)


def open_blocking_channel(
    target: str, trust: ServerTrust, options: ChannelOptions = ()
) -> grpc.Channel:
    """The same as `open_channel`, for synchronous callers (command-line tools)."""
    uri, all_options = target_and_options(target, trust, options)
    credentials = trust.credentials()
    if credentials is None:
        return grpc.insecure_channel(uri, options=all_options)
    return grpc.secure_channel(uri, credentials, options=all_options)

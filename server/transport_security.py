"""The coordinator's side of TLS: its certificate and key, and which listener gets what."""

from __future__ import annotations

import dataclasses
import pathlib

import grpc


@dataclasses.dataclass(frozen=True)
class ServerTls:
    """The coordinator's certificate chain and private key (PEM), used on every listener.

    `operator_ca` (PEM), when set, makes the admin listener require a client certificate
    signed by it; the certificate's subject OU then names the caller's role."""

    certificate_chain: bytes
    private_key: bytes
    operator_ca: bytes | None = None

    @classmethod
    def from_files(
        cls,
        certificate_chain: str | pathlib.Path,
        private_key: str | pathlib.Path,
        operator_ca: str | pathlib.Path | None = None,
    ) -> ServerTls:
        return cls(
            pathlib.Path(certificate_chain).read_bytes(),
            pathlib.Path(private_key).read_bytes(),
            pathlib.Path(operator_ca).read_bytes() if operator_ca else None,
        )

    def device_credentials(self) -> grpc.ServerCredentials:
        """Server-authenticated TLS: devices prove who they are inside the protocol."""
        return grpc.ssl_server_credentials([(self.private_key, self.certificate_chain)])

    def admin_credentials(self) -> grpc.ServerCredentials:
        if self.operator_ca is None:
            return self.device_credentials()
        return grpc.ssl_server_credentials(
            [(self.private_key, self.certificate_chain)],
            root_certificates=self.operator_ca,
            require_client_auth=True,
        )

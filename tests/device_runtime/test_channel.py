"""How the device side decides between verified TLS and plaintext."""

from __future__ import annotations

import pathlib

import pytest

from device_runtime.channel import ServerTrust


def test_the_default_trust_is_tls_against_the_system_store() -> None:
    trust = ServerTrust()

    assert not trust.insecure and trust.root_certificates is None
    assert trust.credentials() is not None


def test_plaintext_only_when_asked_for() -> None:
    assert ServerTrust.from_files(None, insecure=True).credentials() is None
    assert ServerTrust.from_files(None, insecure=False).credentials() is not None


def test_root_certificates_come_from_the_named_file(tmp_path: pathlib.Path) -> None:
    (tmp_path / "ca.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\n")

    trust = ServerTrust.from_files(tmp_path / "ca.pem", insecure=False)

    assert trust.root_certificates == b"-----BEGIN CERTIFICATE-----\n"


def test_insecure_with_root_certificates_is_a_contradiction(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="exclude each other"):
        ServerTrust.from_files(tmp_path / "ca.pem", insecure=True)

"""The shipped enrollment verifiers and the per-population policy built from files."""

from __future__ import annotations

import pathlib

import pytest

from device_runtime.identity import DeviceKey
from server.enrollment.attestation import PlatformAttestationVerifier
from server.enrollment.config import EnrollmentPolicy
from server.enrollment.key_allowlist import KeyAllowlistVerifier
from server.enrollment.shared_secret import SharedSecretVerifier
from server.enrollment.verifier import EnrollmentClaim, EnrollmentRefused

SECRET = b"0123456789abcdef-secret"


def _claim(key: DeviceKey, population: str = "p", secret: bytes = b"") -> EnrollmentClaim:
    return EnrollmentClaim(population, key.public_key_der, secret, ())


def test_the_shared_secret_verifier_accepts_only_the_secret() -> None:
    verifier = SharedSecretVerifier(SECRET)
    key = DeviceKey.generate()

    assert verifier.verify(_claim(key, secret=SECRET)) == "shared-secret"
    for wrong in (b"", SECRET[:-1], SECRET + b"x"):
        with pytest.raises(EnrollmentRefused):
            verifier.verify(_claim(key, secret=wrong))


def test_the_shared_secret_is_not_kept_in_the_clear() -> None:
    verifier = SharedSecretVerifier(SECRET)

    assert SECRET not in repr(vars(verifier)).encode()


def test_a_short_secret_is_refused_at_start() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        SharedSecretVerifier(b"short")


def test_the_allowlist_verifier_accepts_only_listed_keys(tmp_path: pathlib.Path) -> None:
    listed, other = DeviceKey.generate(), DeviceKey.generate()
    path = tmp_path / "keys"
    path.write_text(f"# edge boxes\n{listed.device_id}  # box 1\n\n")
    verifier = KeyAllowlistVerifier.from_file(path)

    assert verifier.verify(_claim(listed)) == "allowlist"
    with pytest.raises(EnrollmentRefused, match="allowlist"):
        verifier.verify(_claim(other))


def test_an_attestation_verifier_needs_a_chain() -> None:
    class AcceptsAnyChain(PlatformAttestationVerifier):
        def verify_chain(self, claim: EnrollmentClaim, chain_der: list[bytes]) -> None:
            return None

    key = DeviceKey.generate()
    with_chain = EnrollmentClaim("p", key.public_key_der, b"", (b"leaf", b"root"))

    assert AcceptsAnyChain().verify(with_chain) == "attestation"
    with pytest.raises(EnrollmentRefused, match="attestation"):
        AcceptsAnyChain().verify(_claim(key))


def test_the_policy_picks_each_populations_verifier(tmp_path: pathlib.Path) -> None:
    listed = DeviceKey.generate()
    (tmp_path / "default.secret").write_bytes(SECRET + b"\n")
    (tmp_path / "digits.secret").write_bytes(b"digits-only-secret-0123")
    (tmp_path / "edge.keys").write_text(listed.device_id + "\n")
    (tmp_path / "enrollment.toml").write_text(
        '[population.digits]\nsecret_file = "digits.secret"\n'
        '[population.edge]\nallowlist_file = "edge.keys"\n'
    )
    policy = EnrollmentPolicy.from_files(
        str(tmp_path / "default.secret"), str(tmp_path / "enrollment.toml")
    )
    key = DeviceKey.generate()

    assert policy.verify(_claim(key, "cats", SECRET)) == "shared-secret"
    assert policy.verify(_claim(key, "digits", b"digits-only-secret-0123")) == "secret:digits"
    assert policy.verify(_claim(listed, "edge")) == "allowlist"
    with pytest.raises(EnrollmentRefused):
        policy.verify(_claim(key, "digits", SECRET))


def test_without_a_verifier_no_population_enrolls() -> None:
    with pytest.raises(EnrollmentRefused, match="takes no enrollments"):
        EnrollmentPolicy().verify(_claim(DeviceKey.generate(), secret=SECRET))


def test_a_population_table_with_both_credentials_is_refused(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "e.toml"
    path.write_text('[population.p]\nsecret_file = "a"\nallowlist_file = "b"\n')

    with pytest.raises(ValueError, match="exactly one"):
        EnrollmentPolicy.from_files(config_file=str(path))

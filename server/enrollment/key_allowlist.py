"""Verifier: a fixed list of device public keys (or their device ids), e.g. a known fleet of
edge boxes whose keys were collected at provisioning. Needs no secret on the device."""

from __future__ import annotations

import pathlib
from collections.abc import Iterable

from device_runtime.identity import device_id_of
from server.enrollment.verifier import EnrollmentClaim, EnrollmentRefused, EnrollmentVerifier


class KeyAllowlistVerifier(EnrollmentVerifier):
    def __init__(self, device_ids: Iterable[str]) -> None:
        self._allowed = frozenset(d.strip().lower() for d in device_ids if d.strip())

    @classmethod
    def from_file(cls, path: str | pathlib.Path) -> KeyAllowlistVerifier:
        """One device id (SHA-256 hex of the DER public key) per line; '#' starts a comment."""
        lines = pathlib.Path(path).read_text().splitlines()
        return cls(line.split("#", 1)[0] for line in lines)

    def verify(self, claim: EnrollmentClaim) -> str:
        if device_id_of(claim.public_key_der) not in self._allowed:
            raise EnrollmentRefused(
                f"enrollment in population {claim.population!r} refused: this key is not on "
                "the population's allowlist"
            )
        return "allowlist"

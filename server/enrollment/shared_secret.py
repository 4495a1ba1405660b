"""Verifier: a secret shared by every installation of a population's app.

The weakest credential that still stops anonymous clients: anyone who extracts it from the app
can enroll keys, so the per-credential and per-network rate limits and the network share cap
(server/flood_limits.py) bound what one such client can do. The coordinator keeps only a salted
SHA-256 of the secret and compares digests in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from server.enrollment.verifier import EnrollmentClaim, EnrollmentRefused, EnrollmentVerifier

min_secret_bytes = 16


class SharedSecretVerifier(EnrollmentVerifier):
    def __init__(self, secret: bytes, credential_id: str = "shared-secret") -> None:
        if len(secret) < min_secret_bytes:
            raise ValueError(
                f"an enrollment secret needs at least {min_secret_bytes} bytes, got {len(secret)}"
            )
        self._salt = os.urandom(16)
        self._digest = self._hash(secret)
        self._credential_id = credential_id

    def _hash(self, secret: bytes) -> bytes:
        return hashlib.sha256(self._salt + secret).digest()

    def verify(self, claim: EnrollmentClaim) -> str:
        if not hmac.compare_digest(self._hash(claim.enrollment_secret), self._digest):
            raise EnrollmentRefused(
                f"enrollment in population {claim.population!r} refused: wrong or missing "
                "enrollment secret"
            )
        return self._credential_id

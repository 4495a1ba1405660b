"""The interface every enrollment verifier implements."""

from __future__ import annotations

import abc
import dataclasses

from server.errors import PermissionDenied


@dataclasses.dataclass(frozen=True)
class EnrollmentClaim:
    """What a device presents to enroll. The coordinator has already checked that the device
    holds the private key of `public_key_der` (the request is signed with it)."""

    population: str
    public_key_der: bytes
    enrollment_secret: bytes
    attestation_chain: tuple[bytes, ...]


class EnrollmentRefused(PermissionDenied):
    """The verifier does not accept the claim; answered PERMISSION_DENIED."""


class EnrollmentVerifier(abc.ABC):
    """Decides whether a device key may enroll in a population.

    `verify` is called on the coordinator's event loop for every Enroll request that passed
    the proof-of-possession check and the rate limits; it must be quick (no network calls)
    and must not keep secrets in the clear longer than needed. It returns the credential id
    the request used, for per-credential rate limiting (e.g. which secret, or "allowlist"),
    or raises EnrollmentRefused with a message the device's operator can act on. It must not
    reveal which part of a secret was wrong.
    """

    @abc.abstractmethod
    def verify(self, claim: EnrollmentClaim) -> str: ...

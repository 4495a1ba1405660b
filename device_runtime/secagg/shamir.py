"""Shamir t-of-n secret sharing of 32-byte secrets over the prime field GF(2^521 - 1).

No well-kept Python library offers it, so it is ours: small and tested. The field is the
Mersenne prime 2^521 - 1, larger than any 32-byte secret, so a secret is one field element.
A share is the point (x, f(x)) of a random polynomial f of degree t - 1 with f(0) = secret;
x is the holder's client id (never 0). Coefficients come from `secrets`, the OS CSPRNG.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Sequence

from device_runtime.secagg.errors import SecAggError

PRIME = (1 << 521) - 1
share_value_bytes = 66  # ceil(521 / 8)
secret_bytes = 32
# Extra shares checked against the reconstructed polynomial (each costs O(t)).
checked_extra_shares = 2


@dataclasses.dataclass(frozen=True)
class Share:
    x: int
    y: int

    def value_bytes(self) -> bytes:
        return self.y.to_bytes(share_value_bytes, "big")


def share_from_bytes(x: int, value: bytes) -> Share:
    """Parses a share received on the wire. Raises SecAggError when it is not a field element."""
    if len(value) != share_value_bytes:
        raise SecAggError(f"a share is {share_value_bytes} bytes, got {len(value)}")
    y = int.from_bytes(value, "big")
    if y >= PRIME:
        raise SecAggError("share value is outside the field")
    if not 0 < x < PRIME:
        raise SecAggError(f"share x-coordinate {x} is not a valid client id")
    return Share(x, y)


def split(secret: bytes, threshold: int, xs: Sequence[int]) -> list[Share]:
    """Shares of `secret`, one per x in `xs`; any `threshold` of them reconstruct it."""
    if len(secret) != secret_bytes:
        raise ValueError(f"secrets are {secret_bytes} bytes, got {len(secret)}")
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} must be in [1, {len(xs)}] (the share count)")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ValueError("share x-coordinates must be distinct and non-zero")
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = []
    for x in xs:
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % PRIME
        shares.append(Share(x, y))
    return shares


def _inverses(values: Sequence[int]) -> list[int]:
    """Modular inverses of non-zero `values` with one exponentiation (Montgomery's trick)."""
    prefix = [1]
    for v in values:
        prefix.append(prefix[-1] * v % PRIME)
    inverse = pow(prefix[-1], -1, PRIME)
    result = [0] * len(values)
    for i in range(len(values) - 1, -1, -1):
        result[i] = prefix[i] * inverse % PRIME
        inverse = inverse * values[i] % PRIME
    return result


class _Interpolation:
    """The polynomial through `basis`, in barycentric form, evaluable anywhere in O(t)."""

    def __init__(self, basis: Sequence[Share]) -> None:
        self._basis = basis
        xs = [s.x for s in basis]
        # The x are small client ids: multiply them as plain integers and reduce once.
        denominators = [math.prod([xi - xj for xj in xs if xj != xi]) % PRIME for xi in xs]
        self._weights = [
            s.y * w % PRIME for s, w in zip(basis, _inverses(denominators), strict=True)
        ]

    def at(self, x0: int) -> int:
        differences = [x0 - s.x for s in self._basis]
        n = len(differences)
        suffix = [1] * (n + 1)
        for i in range(n - 1, -1, -1):
            suffix[i] = suffix[i + 1] * differences[i]
        total, prefix = 0, 1
        for i in range(n):
            total += self._weights[i] * (prefix * suffix[i + 1] % PRIME)
            prefix *= differences[i]
        return total % PRIME


def reconstruct(shares: Sequence[Share], threshold: int) -> bytes:
    """The secret behind `shares` (at least `threshold` of them, distinct x).

    Up to `checked_extra_shares` shares beyond `threshold` must lie on the polynomial the
    first `threshold` define: a wrong share among those used is then detected (SecAggError)
    instead of silently giving a wrong secret (a wrong polynomial meets an honest extra share
    with negligible probability). Shares beyond those are unused, so cannot harm the result.
    With exactly `threshold` shares a bad one cannot be detected here; callers check the
    secret against what it must match (e.g. an advertised public key).
    """
    if len(shares) < threshold:
        raise SecAggError(f"{len(shares)} shares cannot reconstruct a {threshold}-of-n secret")
    if len({s.x for s in shares}) != len(shares):
        raise SecAggError("two shares have the same x-coordinate")
    polynomial = _Interpolation(shares[:threshold])
    for extra in shares[threshold : threshold + checked_extra_shares]:
        if polynomial.at(extra.x) != extra.y:
            raise SecAggError(f"share from client {extra.x} is inconsistent with the others")
    secret = polynomial.at(0)
    if secret >= 1 << (8 * secret_bytes):
        raise SecAggError("shares reconstruct a value that is not a 32-byte secret")
    return secret.to_bytes(secret_bytes, "big")

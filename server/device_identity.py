"""Device identities on the coordinator: enrollment, and the check of every signed message.

A device is its key (device_runtime/identity.py). `enroll` stores a key that proved
possession and passed the population's verifier (server/enrollment/); `verify_check_in`
turns a signed CheckInRequest into the enrolled device it comes from, refusing forgeries,
replays and stale timestamps; `verify_report` checks that an upload header or failure report
is signed by the key its upload token was issued to. The status of each refusal is documented
in protos/device.proto.
"""

from __future__ import annotations

import collections
import dataclasses
import re

from cryptography.hazmat.primitives.asymmetric import ec

from device_runtime import identity
from device_runtime.clock import Clock
from protos import device_pb2
from server.enrollment.config import EnrollmentPolicy
from server.enrollment.verifier import EnrollmentClaim
from server.errors import (
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)
from server.flood_limits import NetworkSettings, RateLimiter, SourceNetworks, TokenBuckets
from server.store import EnrolledDevice, Store

_DEVICE_ID = re.compile(r"[0-9a-f]{64}")
SharedLimits = tuple[TokenBuckets, TokenBuckets]  # (per network, per credential)
max_public_key_bytes = 256
max_population_bytes = 128
max_secret_bytes = 1024
max_attestation_chain = 10
max_certificate_bytes = 16 << 10
verified_reports_kept = 1024  # far above the uploads in flight (upload slots)


@dataclasses.dataclass(frozen=True)
class IdentitySettings:
    # A check-in's timestamp may differ from the coordinator's clock by this much.
    freshness_s: float = 300.0
    # Nonces of accepted check-ins are kept 2 * freshness_s (the longest a replay could still
    # be fresh); past this many the coordinator refuses check-ins (RESOURCE_EXHAUSTED).
    max_recent_nonces: int = 1_000_000
    # Parsed public keys kept in memory (a store read plus parsing is ~30 us otherwise).
    cached_keys: int = 20_000


class ReplayGuard:
    """The nonces of recently accepted check-ins. Entries are kept in arrival order with
    their expiry, so forgetting the expired ones is O(1) each."""

    def __init__(self, keep_s: float, capacity: int) -> None:
        self._keep_s = keep_s
        self._capacity = capacity
        self._expiry: collections.OrderedDict[tuple[str, bytes], float] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._expiry)

    def seen(self, device_id: str, nonce: bytes, now: float) -> bool:
        self._expire(now)
        return (device_id, nonce) in self._expiry

    def add(self, device_id: str, nonce: bytes, now: float) -> None:
        self._expire(now)
        if len(self._expiry) >= self._capacity:
            raise ResourceExhausted("too many check-ins in the freshness window; retry later")
        self._expiry[(device_id, nonce)] = now + self._keep_s

    def _expire(self, now: float) -> None:
        while self._expiry:
            key, expiry = next(iter(self._expiry.items()))
            if expiry > now:
                return
            del self._expiry[key]


class DeviceIdentities:
    def __init__(
        self,
        store: Store,
        clock: Clock,
        policy: EnrollmentPolicy | None = None,
        settings: IdentitySettings | None = None,
        networks: NetworkSettings | None = None,
        shared_limits: SharedLimits | None = None,
    ) -> None:
        """`shared_limits`: the enrollment buckets, per network and per credential, when
        several replicas must draw on the same ones (server/shared_rate_limits.py); by
        default they live in this process's memory."""
        self._store = store
        self._clock = clock
        self.policy = policy or EnrollmentPolicy()
        self.settings = settings or IdentitySettings()
        self.networks = SourceNetworks(networks or NetworkSettings())
        s = self.networks.settings
        self._per_network, self._per_credential = shared_limits or (
            RateLimiter(s.enroll_per_network, s.max_tracked_keys),
            RateLimiter(s.enroll_per_credential, s.max_tracked_keys),
        )
        # The longest a replay could still pass the freshness check (replicas keep assigned
        # check-ins' nonces in PostgreSQL this long too).
        self.nonce_kept_s = 2 * self.settings.freshness_s
        self._nonces = ReplayGuard(self.nonce_kept_s, self.settings.max_recent_nonces)
        # The nonces seen before a restart are gone, so a check-in signed before this process
        # started could be a replay; the device re-enrolls and signs again (runtime.py).
        self._started_ms = int(clock.now() * 1000)
        self._keys: collections.OrderedDict[tuple[str, str], ec.EllipticCurvePublicKey] = (
            collections.OrderedDict()
        )
        # Upload headers verified before their payload was read: the header is checked again
        # when the payload is added (the round may have moved on meanwhile), and that second
        # check takes the verdict from here (and removes it) instead of repeating the ECDSA
        # verification (~65 us). An entry holds exactly what was verified, so a hit is the
        # same verdict. Uploads that never finish leave entries until the cap evicts them.
        self._verified_reports: collections.OrderedDict[tuple[str, str, bytes, bytes], None] = (
            collections.OrderedDict()
        )

    # ----- enrollment ----------------------------------------------------------------------

    def enroll(
        self, request: device_pb2.EnrollRequest, peer: str = ""
    ) -> device_pb2.EnrollResponse:
        """Enrolls the request's key; refusals change nothing (codes: device.proto, Enroll)."""
        if not 0 < len(request.population.encode()) <= max_population_bytes:
            raise InvalidArgument(f"population must be 1 to {max_population_bytes} bytes")
        if len(request.enrollment_secret) > max_secret_bytes:
            raise InvalidArgument(f"enrollment_secret exceeds {max_secret_bytes} bytes")
        if len(request.public_key) > max_public_key_bytes:
            raise InvalidArgument(f"public_key exceeds {max_public_key_bytes} bytes")
        if len(request.attestation_chain) > max_attestation_chain or any(
            len(c) > max_certificate_bytes for c in request.attestation_chain
        ):
            raise InvalidArgument(
                f"attestation_chain: at most {max_attestation_chain} certificates of "
                f"{max_certificate_bytes} bytes"
            )
        try:
            public_key = identity.load_public_key(request.public_key)
        except identity.IdentityError as exc:
            raise InvalidArgument(f"public_key: {exc}") from None
        if not identity.verifies(
            public_key, request.signature, identity.enroll_signed_bytes(request)
        ):
            raise Unauthenticated("the enrollment is not signed by the key it enrolls")
        device_id = identity.device_id_of(request.public_key)
        now = self._clock.now()
        known = self._store.enrolled_device(device_id, request.population)
        if known is None:
            network = self.networks.of(peer)
            if network is not None and not self._per_network.try_take(network, now):
                raise ResourceExhausted(
                    f"too many enrollments from network {network} lately; retry later"
                )
            claim = EnrollmentClaim(
                request.population,
                request.public_key,
                request.enrollment_secret,
                tuple(request.attestation_chain),
            )
            credential = self.policy.verify(claim)
            if not self._per_credential.try_take(credential, now):
                raise ResourceExhausted("too many enrollments with this credential lately")
            self._store.enroll_device(
                EnrolledDevice(device_id, request.population, request.public_key, credential, now)
            )
        else:
            # Re-enrolling (e.g. to learn the clock again) still needs the credential, but
            # costs no rate-limit tokens: it adds no identity.
            self.policy.verify(
                EnrollmentClaim(
                    request.population,
                    request.public_key,
                    request.enrollment_secret,
                    tuple(request.attestation_chain),
                )
            )
        return device_pb2.EnrollResponse(device_id=device_id, server_time_s=now)

    def tracked_devices(self) -> dict[str, int]:
        """Entries held in memory per device or network (see Coordinator.tracked_devices)."""
        return {
            "recent_nonces": len(self._nonces),
            "cached_keys": len(self._keys),
            "verified_reports": len(self._verified_reports),
            "enrollment_buckets": len(self._per_network) + len(self._per_credential),
        }

    # ----- signed messages -----------------------------------------------------------------

    def enrolled_key(self, device_id: str, population: str) -> ec.EllipticCurvePublicKey | None:
        cached = self._keys.get((device_id, population))
        if cached is not None:
            self._keys.move_to_end((device_id, population))
            return cached
        device = self._store.enrolled_device(device_id, population)
        if device is None:
            return None
        key = identity.load_public_key(device.public_key_der)
        self._keys[(device_id, population)] = key
        if len(self._keys) > self.settings.cached_keys:
            self._keys.popitem(last=False)
        return key

    def enrolled_key_der(self, device_id: str, population: str) -> bytes:
        device = self._store.enrolled_device(device_id, population)
        return device.public_key_der if device is not None else b""

    def verify_check_in(self, request: device_pb2.CheckInRequest) -> str:
        """The enrolled device id a check-in comes from. Raises InvalidArgument (malformed),
        Unauthenticated (unenrolled, bad signature, stale, replayed) or ResourceExhausted."""
        if not _DEVICE_ID.fullmatch(request.device_id):
            raise InvalidArgument(
                "device_id must be the SHA-256 hex (64 lowercase characters) of the device's "
                "enrolled public key"
            )
        if len(request.nonce) != identity.nonce_bytes:
            raise InvalidArgument(f"nonce must be {identity.nonce_bytes} bytes")
        key = self.enrolled_key(request.device_id, request.population)
        if key is None:
            raise Unauthenticated(
                f"this device is not enrolled in population {request.population!r}; enroll first"
            )
        if not identity.verifies(key, request.signature, identity.check_in_signed_bytes(request)):
            raise Unauthenticated("the check-in's signature does not verify")
        now = self._clock.now()
        skew = abs(request.timestamp_ms / 1000.0 - now)
        if not skew <= self.settings.freshness_s:
            raise Unauthenticated(
                f"the check-in's timestamp is {skew:.0f} s from the coordinator's clock "
                f"(allowed: {self.settings.freshness_s:.0f} s); enroll again to learn it"
            )
        if request.timestamp_ms < self._started_ms:
            raise Unauthenticated(
                "the check-in was signed before the coordinator started, so a replay cannot be "
                "ruled out; enroll again and sign a new one"
            )
        if self._nonces.seen(request.device_id, request.nonce, now):
            raise Unauthenticated("replayed check-in: this nonce was already used")
        self._nonces.add(request.device_id, request.nonce, now)
        return request.device_id

    def verify_report(
        self,
        signature: bytes,
        signed_bytes: bytes,
        device_id: str,
        population: str,
        checked_again: bool = False,
    ) -> None:
        """Raises PermissionDenied unless `signature` over `signed_bytes` is by the key of
        `device_id`, the device an upload token was issued to. `checked_again`: the same
        report will be verified once more (an upload header, before and after its payload)."""
        verified = (device_id, population, signature, signed_bytes)
        if verified in self._verified_reports:
            del self._verified_reports[verified]  # verified when its header was first checked
            return
        key = self.enrolled_key(device_id, population)
        if key is None or not identity.verifies(key, signature, signed_bytes):
            raise PermissionDenied("not signed by the device this upload token was issued to")
        if checked_again:
            self._verified_reports[verified] = None
            if len(self._verified_reports) > verified_reports_kept:
                self._verified_reports.popitem(last=False)

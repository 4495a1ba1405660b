"""Where a platform attestation plugs in (not implemented: no verifier ships).

Android key attestation proves that a P-256 key was generated in a phone's secure hardware
(TEE or StrongBox), by a genuine, unmodified device running a known app. The device asks its
keystore to generate the key with an attestation challenge and sends the resulting
certificate chain (leaf first) in EnrollRequest.attestation_chain. A verifier for it would
subclass `PlatformAttestationVerifier` and implement `verify_chain`:
  1. the chain verifies up to one of Google's attestation root keys (pinned, shipped with the
     coordinator; never fetched at run time), and no certificate is on the revocation list
     (a list the operator refreshes out of band);
  2. the leaf's subject public key is `claim.public_key_der` (the key the device proved it
     holds);
  3. the leaf's KeyDescription extension (OID 1.3.6.1.4.1.11129.2.1.17) says:
     attestationSecurityLevel >= TRUSTED_ENVIRONMENT, the challenge the coordinator expects,
     the app's package name and signing-certificate digest, verified boot state VERIFIED,
     and an OS patch level no older than the operator's minimum.
The challenge must be fresh and bound to the population: a nonce the coordinator issued
(which needs an extra round trip the protocol does not have yet) or, as a weaker fallback,
SHA-256 of the population name and the current hour.
Because the coordinator and every neighbour in a secure-aggregation session could check such a
chain against Google's roots, it is also the trusted identity source that makes signed SecAgg
keys meaningful against a malicious coordinator (README, "Security").
"""

from __future__ import annotations

import abc

from server.enrollment.verifier import EnrollmentClaim, EnrollmentRefused, EnrollmentVerifier


class PlatformAttestationVerifier(EnrollmentVerifier):
    """Base of an attestation-based verifier: the claim must carry a certificate chain."""

    def verify(self, claim: EnrollmentClaim) -> str:
        if not claim.attestation_chain:
            raise EnrollmentRefused(
                f"population {claim.population!r} needs a key attestation certificate chain"
            )
        self.verify_chain(claim, list(claim.attestation_chain))
        return "attestation"

    @abc.abstractmethod
    def verify_chain(self, claim: EnrollmentClaim, chain_der: list[bytes]) -> None:
        """Raises EnrollmentRefused unless `chain_der` attests `claim.public_key_der` as the
        module docstring describes."""

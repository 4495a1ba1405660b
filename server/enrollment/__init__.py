"""Enrollment: which device keys may join a population, decided by a pluggable verifier.

`verifier.EnrollmentVerifier` is the interface; `shared_secret` and `key_allowlist` are the
two shipped verifiers; `attestation` documents how a platform attestation (Android key
attestation) plugs in; `config` builds a population -> verifier table from `overnight serve`'s
options.
"""

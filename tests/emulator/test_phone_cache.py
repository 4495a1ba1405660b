"""Each phone downloads for itself; the worker holds one copy of the bytes."""

from __future__ import annotations

from device_runtime.cache import sha256_hex
from emulator.fleet_worker import PhoneCache, SharedBytes


def test_phone_cache_hits_only_what_that_phone_downloaded() -> None:
    shared = SharedBytes(max_entries=2)
    first, second = PhoneCache(shared), PhoneCache(shared)
    model, weights = b"model", b"weights"

    first.put(sha256_hex(model), model)

    assert first.get(sha256_hex(model)) == model
    assert second.get(sha256_hex(model)) is None  # the second phone must download it itself
    for version in range(3):  # new weights every round; the model is used every round too
        data = weights + bytes([version])
        first.put(sha256_hex(data), data)
        assert first.get(sha256_hex(model)) == model

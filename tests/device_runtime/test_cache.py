import pathlib

import pytest

from device_runtime.cache import ResourceCache, sha256_hex


def test_resources_survive_a_restart_on_disk(tmp_path: pathlib.Path) -> None:
    data = b"weights" * 100
    ResourceCache(tmp_path).put(sha256_hex(data), data)

    restarted = ResourceCache(tmp_path)

    assert restarted.get(sha256_hex(data)) == data
    assert restarted.hits == 1


def test_corrupted_file_is_treated_as_absent(tmp_path: pathlib.Path) -> None:
    data = b"model bytes"
    digest = sha256_hex(data)
    ResourceCache(tmp_path).put(digest, data)
    (tmp_path / digest).write_bytes(b"bit rot")

    assert ResourceCache(tmp_path).get(digest) is None
    assert not (tmp_path / digest).exists()


def test_data_that_does_not_match_its_hash_is_refused() -> None:
    with pytest.raises(ValueError, match="does not match"):
        ResourceCache().put(sha256_hex(b"a"), b"b")


def test_memory_cache_is_bounded() -> None:
    cache = ResourceCache(max_memory_entries=2)
    blobs = [bytes([i]) * 10 for i in range(3)]
    for blob in blobs:
        cache.put(sha256_hex(blob), blob)

    assert cache.get(sha256_hex(blobs[0])) is None
    assert cache.get(sha256_hex(blobs[2])) == blobs[2]

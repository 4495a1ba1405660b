"""EMNIST (TFF's .h5) and FEMNIST (LEAF JSON) loaders, on small files generated here."""

from __future__ import annotations

import json
import pathlib
import pickle

import h5py
import numpy as np
import pytest

from emulator.federated_files import EmnistH5Clients, FederatedFileError, FemnistJsonClients


def _emnist_file(path: pathlib.Path, writers: dict[str, int]) -> None:
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        for writer, n in writers.items():
            group = f.create_group(f"examples/{writer}")
            group.create_dataset("pixels", data=rng.random((n, 28, 28), dtype=np.float32))
            group.create_dataset("label", data=rng.integers(0, 62, n, dtype=np.int32))


def _leaf_file(path: pathlib.Path, writers: dict[str, int]) -> None:
    rng = np.random.default_rng(1)
    content = {
        "users": list(writers),
        "num_samples": list(writers.values()),
        "user_data": {
            user: {
                "x": rng.random((n, 784)).round(3).tolist(),
                "y": rng.integers(0, 62, n).tolist(),
            }
            for user, n in writers.items()
        },
    }
    path.write_text(json.dumps(content))


def test_emnist_h5_gives_each_phone_one_writer(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "fed_emnist_train.h5"
    _emnist_file(path, {"f0000_14": 5, "f0001_41": 7})
    source = EmnistH5Clients(path)

    first, second, wrapped = source.client(0), source.client(1), source.client(2)

    assert source.client_ids() == ["f0000_14", "f0001_41"]
    assert (len(first), len(second)) == (5, 7)
    assert first.x.shape == (5, 28, 28) and first.x.dtype == np.float32
    assert first.y.dtype == np.int32
    assert np.array_equal(wrapped.x, first.x)


def test_emnist_source_survives_pickling_to_a_worker(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "e.h5"
    _emnist_file(path, {"a": 3})
    source = EmnistH5Clients(path)
    source.client(0)

    copy = pickle.loads(pickle.dumps(source))

    assert np.array_equal(copy.client(0).y, source.client(0).y)


def test_emnist_file_without_examples_group_says_what_it_expects(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("pixels", data=np.zeros((1, 28, 28)))

    with pytest.raises(FederatedFileError, match="examples/<client_id>"):
        EmnistH5Clients(path).client(0)


def test_emnist_writer_missing_labels_is_refused(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("examples/w/pixels", data=np.zeros((2, 28, 28), np.float32))

    with pytest.raises(FederatedFileError, match=r"lacks \['label'\]"):
        EmnistH5Clients(path).client(0)


def test_missing_or_non_hdf5_file_is_refused(tmp_path: pathlib.Path) -> None:
    (tmp_path / "text.h5").write_text("not hdf5")

    with pytest.raises(FederatedFileError, match="no such"):
        EmnistH5Clients(tmp_path / "absent.h5").client(0)
    with pytest.raises(FederatedFileError, match="not an HDF5 file"):
        EmnistH5Clients(tmp_path / "text.h5").client(0)


def test_leaf_directory_gives_writers_across_files_in_order(tmp_path: pathlib.Path) -> None:
    _leaf_file(tmp_path / "all_data_0.json", {"f3100_00": 4, "f3101_11": 2})
    _leaf_file(tmp_path / "all_data_1.json", {"f3200_07": 3})
    source = FemnistJsonClients(tmp_path)

    sizes = [len(source.client(i)) for i in range(4)]

    assert source.num_writers == 3
    assert sizes == [4, 2, 3, 4]
    assert source.client(2).x.shape == (3, 28, 28)


def test_leaf_file_whose_counts_disagree_is_refused(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "d.json"
    _leaf_file(path, {"u": 3})
    content = json.loads(path.read_text())
    content["num_samples"] = [5]
    path.write_text(json.dumps(content))

    with pytest.raises(FederatedFileError, match="num_samples says 5, y has 3"):
        FemnistJsonClients(path).client(0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"users": []}', "needs 'users' and 'user_data'"),
        ('{"users": [], "user_data": {}}', "list no users"),
        ('{"users": ["u"], "user_data": {"u": {"x": [[0.5, 0.5]], "y": [1]}}}', "784 pixels"),
    ],
)
def test_malformed_leaf_files_are_refused(tmp_path: pathlib.Path, text: str, message: str) -> None:
    path = tmp_path / "d.json"
    path.write_text(text)

    with pytest.raises(FederatedFileError, match=message):
        FemnistJsonClients(path).client(0)

import pathlib

import pytest

from server.config import TaskConfig
from server.errors import InvalidArgument


def test_toml_config_is_read_with_defaults(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "task.toml"
    path.write_text('[task]\ntask_id = "mnist"\npopulation = "phones"\ntarget_reports = 100\n')

    config = TaskConfig.from_toml(path)

    assert config.target_reports == 100
    assert config.over_selection == 1.3
    assert config.selection_quota == 130
    assert config.effective_min_reports == 100


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"target_reports": 0}, "'target_reports': must be >= 1"),
        ({"over_selection": 0.5}, "'over_selection'"),
        ({"min_reports": 20, "target_reports": 10}, "'min_reports'"),
        ({"epochs": "three"}, "'epochs': expected int"),
        ({"target_report": 3}, r"unknown task config field\(s\) \['target_report'\]"),
        ({"task_id": "no spaces"}, "'task_id'"),
    ],
)
def test_a_config_error_names_the_field(values: dict, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        TaskConfig.from_dict({"task_id": "t", "population": "p", **values})


def test_missing_required_field_is_named() -> None:
    with pytest.raises(InvalidArgument, match="'population' is required"):
        TaskConfig.from_dict({"task_id": "t"})


def test_invalid_toml_says_so(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("task_id = \n")

    with pytest.raises(InvalidArgument, match="not valid TOML"):
        TaskConfig.from_toml(path)


def test_proto_round_trip() -> None:
    config = TaskConfig(
        task_id="t", population="p", target_reports=7, min_reports=5, max_examples=30
    )

    assert TaskConfig.from_proto(config.to_proto()) == config


def test_optimizer_and_eligibility_fields_round_trip_through_toml_and_proto(
    tmp_path: pathlib.Path,
) -> None:
    path = tmp_path / "task.toml"
    path.write_text(
        '[task]\ntask_id = "t"\npopulation = "p"\nserver_optimizer = "yogi"\n'
        "server_learning_rate = 0.01\nkeep_order = true\nmin_separation_s = 86400\n"
        'min_runtime_version = "0.1.0"\nmax_concurrent_rounds = 2\n'
    )

    config = TaskConfig.from_toml(path)

    assert config.keep_order is True
    assert config.optimizer().epsilon == 1e-3  # TFF's Yogi default
    assert config.optimizer().initial_preconditioner == 1e-6
    assert TaskConfig.from_proto(config.to_proto()) == config


def test_unknown_server_optimizer_is_named() -> None:
    with pytest.raises(InvalidArgument, match="'server_optimizer': must be one of"):
        TaskConfig.from_dict({"task_id": "t", "population": "p", "server_optimizer": "lamb"})

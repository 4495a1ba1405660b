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
        ({"target_reports": 0}, r"'target_reports': must be an integer in \[1, "),
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


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("over_selection", float("inf")),
        ("over_selection", float("nan")),
        ("over_selection", 1e9),
        ("selection_deadline_s", float("inf")),
        ("reporting_deadline_s", 1e300),
        ("server_learning_rate", float("inf")),
        ("server_momentum", float("nan")),
        ("server_epsilon", float("inf")),
        ("fedprox_mu", float("inf")),
        ("min_separation_s", float("inf")),
        ("total_rounds", 1 << 62),
        ("target_reports", 1 << 62),
        ("epochs", 1 << 40),
        ("batch_size", 1 << 40),
        ("max_examples", -1),
        ("max_examples_per_device", 0),
        ("max_examples_per_device", 1 << 62),
        ("min_examples", 1 << 62),
        ("max_concurrent_rounds", 1 << 20),
    ],
)
def test_every_number_is_finite_and_in_range_with_the_field_named(field: str, value: float) -> None:
    with pytest.raises(InvalidArgument, match=f"task config field '{field}': must be"):
        TaskConfig(task_id="t", population="p", **{field: value}).validate()


def test_strings_are_bounded_with_the_field_named() -> None:
    with pytest.raises(InvalidArgument, match="'population': must be at most 128 bytes"):
        TaskConfig(task_id="t", population="p" * 129).validate()
    with pytest.raises(InvalidArgument, match="'aggregator': must be at most"):
        TaskConfig(task_id="t", population="p", aggregator="mean" * 1000).validate()


def test_an_infinite_bound_inside_the_aggregator_expression_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="'aggregator'"):
        TaskConfig(
            task_id="t",
            population="p",
            aggregator="dp_aggregator(noise_multiplier=1, clients_per_round=inf)",
        ).validate()


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
        task_id="t",
        population="p",
        target_reports=7,
        min_reports=5,
        max_examples=30,
        max_examples_per_device=500,
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


@pytest.mark.parametrize(
    "aggregator",
    [
        "secure_aggregator(clip=1e308)",
        "zeroing(norm=1e300, mean)",
        "clipping(initial_estimate=1e20, mean)",
        "dp_aggregator(noise_multiplier=1, clients_per_round=1e15)",
        "uniform(threshold=inf)",
        "mean(uniform(threshold=inf))",
    ],
)
def test_aggregator_parameters_are_finite_and_bounded(aggregator: str) -> None:
    with pytest.raises(InvalidArgument, match="'aggregator'"):
        TaskConfig(task_id="t", population="p", aggregator=aggregator).validate()

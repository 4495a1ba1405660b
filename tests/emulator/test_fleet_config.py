"""Fleet configuration: defaults are valid, files load, bad values are refused by name."""

from __future__ import annotations

import dataclasses
import pathlib

import pytest

from emulator.fleet_config import DailyRoutine, FleetConfig, FleetConfigError, NetworkProfile


def test_defaults_are_valid() -> None:
    assert FleetConfig().validate() == FleetConfig()


def test_toml_file_overrides_routine_and_tiers(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(
        """
[fleet]
phones = 300
seed = 9
[fleet.routine]
p_day_charge = 0.1
[[fleet.tiers]]
name = "only"
share = 1.0
compute_slowdown = 2.0
memory_mb = 4096
"""
    )

    config = FleetConfig.from_toml(path)

    assert (config.phones, config.seed, config.routine.p_day_charge) == (300, 9, 0.1)
    assert [t.name for t in config.tiers] == ["only"]
    assert config.networks == FleetConfig().networks


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"phones": 0}, "'phones': must be >= 1"),
        ({"colour": "red"}, r"unknown fleet config field\(s\) \['colour'\]"),
        ({"routine": {"p_home_wifi": 1.5}}, "'routine.p_home_wifi': must be in"),
        ({"routine": {"bedtime": 3}}, r"\['routine.bedtime'\]"),
        ({"routine": {"wake_h": 25}}, "'routine.wake_h': must be an hour"),
        ({"tiers": "fast"}, "expected a list of tables"),
        ({"tiers": [{"name": "x", "share": 1, "compute_slowdown": 0.5, "memory_mb": 1}]}, "< 1"),
        ({"networks": [{"name": "x", "share": 0, "latency_ms": 1, "bandwidth_mbps": 1}]}, "shares"),
        ({"time_zones": [{"utc_offset_h": 1}]}, "time_zones"),
        ({"phones": "many"}, "wrong type"),
    ],
)
def test_bad_values_are_refused_with_the_field_named(
    values: dict[str, object], message: str
) -> None:
    with pytest.raises(FleetConfigError, match=message):
        FleetConfig.from_dict(values)


def test_invalid_toml_says_so(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text("phones = = 3")

    with pytest.raises(FleetConfigError, match="not valid TOML"):
        FleetConfig.from_toml(path)


def test_zero_bandwidth_is_refused() -> None:
    config = dataclasses.replace(
        FleetConfig(), networks=(NetworkProfile("dead", 1.0, 10.0, 0.0),), routine=DailyRoutine()
    )

    with pytest.raises(FleetConfigError, match="bandwidth_mbps"):
        config.validate()

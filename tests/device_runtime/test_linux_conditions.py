"""LinuxConditions over fake sysfs/procfs trees in a temporary directory."""

from __future__ import annotations

import pathlib

from device_runtime.conditions import LinuxConditions

ROUTE_HEADER = "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\n"


def _write(root: pathlib.Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _phone(
    root: pathlib.Path,
    *,
    ac_online: str = "1",
    battery: str = "Discharging",
    load: str = "0.10",
    interface: str = "wlan0",
    devtype: str = "wlan",
) -> LinuxConditions:
    _write(root, "sys/class/power_supply/ac/type", "Mains\n")
    _write(root, "sys/class/power_supply/ac/online", ac_online + "\n")
    _write(root, "sys/class/power_supply/battery/type", "Battery\n")
    _write(root, "sys/class/power_supply/battery/status", battery + "\n")
    _write(root, "proc/loadavg", f"{load} 0.20 0.30 1/200 4242\n")
    _write(
        root,
        "proc/net/route",
        ROUTE_HEADER
        + f"{interface}\t00000000\t0102A8C0\t0003\t0\t0\t600\t00000000\n"
        + f"{interface}\t0002A8C0\t00000000\t0001\t0\t0\t600\t00FFFFFF\n",
    )
    _write(root, f"sys/class/net/{interface}/uevent", f"DEVTYPE={devtype}\nINTERFACE={interface}\n")
    return LinuxConditions(root, max_load_per_cpu=0.5, cpu_count=2)


def test_plugged_in_quiet_device_on_wifi_is_eligible(tmp_path: pathlib.Path) -> None:
    assert _phone(tmp_path).current().eligible


def test_unplugged_battery_is_not_charging(tmp_path: pathlib.Path) -> None:
    snapshot = _phone(tmp_path, ac_online="0").current()

    assert not snapshot.charging
    assert snapshot.describe() == "not charging"


def test_battery_reporting_charging_counts_without_a_mains_entry(tmp_path: pathlib.Path) -> None:
    conditions = _phone(tmp_path, ac_online="0", battery="Charging")

    assert conditions.current().charging


def test_busy_cpu_is_not_idle(tmp_path: pathlib.Path) -> None:
    assert not _phone(tmp_path, load="1.50").current().idle  # 0.75 per CPU > 0.5


def test_cellular_default_route_is_metered(tmp_path: pathlib.Path) -> None:
    assert not _phone(tmp_path, interface="rmnet0", devtype="wwan").current().unmetered
    assert not _phone(tmp_path / "b", interface="usb0", devtype="wwan").current().unmetered


def test_no_default_route_is_not_unmetered(tmp_path: pathlib.Path) -> None:
    conditions = _phone(tmp_path)
    _write(tmp_path, "proc/net/route", ROUTE_HEADER)

    assert not conditions.current().unmetered


def test_machine_without_power_supply_entries_is_mains_powered(tmp_path: pathlib.Path) -> None:
    _write(tmp_path, "proc/loadavg", "0.00 0.00 0.00 1/1 1\n")

    assert LinuxConditions(tmp_path, cpu_count=1).charging()


def test_unreadable_load_average_is_not_idle(tmp_path: pathlib.Path) -> None:
    conditions = _phone(tmp_path)
    (tmp_path / "proc/loadavg").write_text("garbage\n")

    assert not conditions.current().idle

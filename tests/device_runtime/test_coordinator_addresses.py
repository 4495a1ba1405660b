"""`--server` as one or several coordinators: the gRPC target and the certificate's name."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from device_runtime.channel import ServerTrust, target_and_options
from device_runtime.coordinator_addresses import AddressError, CoordinatorAddresses


def test_one_host_is_dialed_as_given_and_its_certificate_carries_that_host() -> None:
    addresses = CoordinatorAddresses.parse("coordinators.example:443")

    assert addresses.target == "coordinators.example:443"
    assert addresses.certificate_name == "coordinators.example"


def test_a_list_of_ipv4_addresses_becomes_an_ipv4_target() -> None:
    addresses = CoordinatorAddresses.parse("10.0.0.1:443, 10.0.0.2:443,10.0.0.3:8443")

    assert addresses.target == "ipv4:10.0.0.1:443,10.0.0.2:443,10.0.0.3:8443"
    assert [str(endpoint) for endpoint in addresses.endpoints] == [
        "10.0.0.1:443",
        "10.0.0.2:443",
        "10.0.0.3:8443",
    ]


def test_a_list_of_ipv6_addresses_keeps_their_brackets() -> None:
    addresses = CoordinatorAddresses.parse("[::1]:50051,[fd00::2]:50051")

    assert addresses.target == "ipv6:[::1]:50051,[fd00::2]:50051"


def test_ports_of_one_host_share_its_name_for_the_certificate() -> None:
    addresses = CoordinatorAddresses.parse("127.0.0.1:5001,127.0.0.1:5002")

    assert addresses.certificate_name == "127.0.0.1"


def test_different_hosts_need_the_name_their_certificate_carries() -> None:
    addresses = CoordinatorAddresses.parse("10.0.0.1:443,10.0.0.2:443")

    with pytest.raises(AddressError, match="--server-name"):
        addresses.require_certificate_name()
    named = CoordinatorAddresses.parse("10.0.0.1:443,10.0.0.2:443", "coordinators.example")
    assert named.require_certificate_name() == "coordinators.example"


def test_a_dns_target_names_its_host_for_the_certificate() -> None:
    addresses = CoordinatorAddresses.parse("dns://127.0.0.1:5353/coordinators.test:443")

    assert addresses.target == "dns://127.0.0.1:5353/coordinators.test:443"
    assert addresses.certificate_name == "coordinators.test"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        ("10.0.0.1:443,,10.0.0.2:443", "empty entry"),
        ("10.0.0.1:443,", "empty entry"),
        ("10.0.0.1", "no port"),
        ("10.0.0.1:0", "1 to 65535"),
        ("10.0.0.1:65536", "1 to 65535"),
        ("10.0.0.1:https", "1 to 65535"),
        ("::1:443", "brackets"),
        ("[::1:443", r"\[address\]:port"),
        ("[10.0.0.1]:443", "only IPv6"),
        ("[fe80::zz]:443", "not an IPv6 address"),
        ("bad host!:443", "not a DNS name"),
        ("a.example:443,b.example:443", "lists DNS names"),
        ("10.0.0.1:443,b.example:443", "lists DNS names"),
        ("10.0.0.1:443,[::1]:443", "mixes IPv4 and IPv6"),
        ("10.0.0.1:443,10.0.0.1:443", "twice"),
        ("dns:coordinators.test", "no port"),
        ("dns://10.0.0.53", "dns://dns-server/host:port"),
        ("dns:///10.0.0.1:443", "not an IP address"),
    ],
)
def test_a_malformed_server_says_what_is_wrong(text: str, reason: str) -> None:
    with pytest.raises(AddressError, match=reason):
        CoordinatorAddresses.parse(text)


def test_a_malformed_server_name_is_refused() -> None:
    with pytest.raises(AddressError, match="not a DNS name"):
        CoordinatorAddresses.parse("10.0.0.1:443", "no such name!")


def test_every_channel_balances_round_robin_and_retries_device_calls_on_unavailable() -> None:
    target, options = target_and_options("127.0.0.1:5001,127.0.0.1:5002", ServerTrust())

    config = json.loads(str(dict(options)["grpc.service_config"]))
    assert target == "ipv4:127.0.0.1:5001,127.0.0.1:5002"
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    [method] = config["methodConfig"]
    assert method["name"] == [{"service": "overnight.v1.DeviceService"}]
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]


def test_tls_checks_the_certificate_name_whichever_coordinator_answers() -> None:
    _, options = target_and_options(
        "10.0.0.1:443,10.0.0.2:443", ServerTrust(server_name="coordinators.example")
    )

    assert dict(options)["grpc.ssl_target_name_override"] == "coordinators.example"


def test_plaintext_needs_no_certificate_name() -> None:
    _, options = target_and_options("10.0.0.1:443,10.0.0.2:443", ServerTrust(insecure=True))

    assert "grpc.ssl_target_name_override" not in dict(options)


def test_a_list_of_different_hosts_without_a_name_is_refused_under_tls() -> None:
    with pytest.raises(AddressError, match="--server-name"):
        target_and_options("10.0.0.1:443,10.0.0.2:443", ServerTrust())


def test_the_server_name_needs_tls() -> None:
    with pytest.raises(ValueError, match="exclude each other"):
        ServerTrust.from_files(None, insecure=True, server_name="coordinators.example")


def _overnight(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "overnight", *args],
        cwd=pathlib.Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_device_command_refuses_a_list_of_names_and_says_what_to_give(
    tmp_path: pathlib.Path,
) -> None:
    result = _overnight(
        "device",
        "--server",
        "a.example:443,b.example:443",
        "--population",
        "p",
        "--examples",
        str(tmp_path / "x.npz"),
    )

    assert result.returncode == 2
    assert "a list takes IP addresses only" in result.stderr


def test_the_emulator_refuses_different_hosts_without_a_server_name() -> None:
    result = _overnight("emulate", "--server", "10.0.0.1:443,10.0.0.2:443", "--duration", "1")

    assert result.returncode == 2
    assert "give --server-name" in result.stderr

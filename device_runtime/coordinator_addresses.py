"""Where the coordinators are: `--server` as a gRPC target that names one or several of them.

A device reaches a deployment of several coordinator replicas through gRPC's own name
resolution and load balancing, never through a balancer of ours:
- one `host:port`: gRPC's DNS resolver finds every address of the name, and the channel's
  `round_robin` policy spreads calls over them (one address is the single-coordinator case);
- a comma-separated list of IP `address:port`s, all IPv4 or all IPv6 (`[::1]:443`): the
  channel dials exactly those, through gRPC's `ipv4:` / `ipv6:` target schemes;
- a gRPC `dns:` target, e.g. `dns://10.0.0.2:53/coordinators.internal:443`, to ask a
  particular DNS server.
A list holds IP addresses only: gRPC resolves one name per channel, and one name with several
addresses is how DNS names several coordinators.

With TLS, the certificate must carry one name: the host of a single entry, the shared host of
a list, or the `--server-name` the caller gives, which a list of different hosts needs.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re

# An entry's port: 1 to 65535, digits only.
_port_pattern = re.compile(r"[0-9]{1,5}")
# A DNS name as gRPC's resolver accepts it: labels of letters, digits, hyphens and
# underscores (the characters that appear in service names), separated by dots.
_name_pattern = re.compile(
    r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62}))*\.?"
)


class AddressError(ValueError):
    """`--server` does not name coordinators this client can dial; the message says why."""


@dataclasses.dataclass(frozen=True)
class Endpoint:
    host: str  # a DNS name, or an IP address without brackets
    port: int

    @property
    def ip_version(self) -> int | None:
        """4 or 6 for an IP address, None for a DNS name."""
        try:
            return ipaddress.ip_address(self.host).version
        except ValueError:
            return None

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.ip_version == 6 else f"{self.host}:{self.port}"


@dataclasses.dataclass(frozen=True)
class CoordinatorAddresses:
    """The gRPC target for a `--server` value, and the name the certificate must carry."""

    target: str
    endpoints: tuple[Endpoint, ...]  # what the caller listed (a dns: target: its name)
    certificate_name: str | None  # None: the hosts of a list differ, none was given

    @classmethod
    def parse(cls, text: str, server_name: str | None = None) -> CoordinatorAddresses:
        """Raises AddressError with a message that says what is wrong with `text`."""
        text = text.strip()
        if not text:
            raise AddressError("--server is empty: give host:port, or several IP address:port")
        if server_name is not None and not _name_pattern.fullmatch(server_name):
            _ip_or_refuse(server_name, f"--server-name {server_name!r} is not a DNS name or IP")
        if text.startswith("dns:"):
            endpoint = _dns_target_endpoint(text)
            return cls(text, (endpoint,), server_name or endpoint.host)
        entries = [entry.strip() for entry in text.split(",")]
        if any(not entry for entry in entries):
            raise AddressError(
                f"--server {text!r} has an empty entry (two commas, or one at an end)"
            )
        endpoints = tuple(_endpoint(entry) for entry in entries)
        if len(endpoints) == 1:
            [endpoint] = endpoints
            # gRPC's default scheme (dns:) resolves a name to all its addresses.
            return cls(str(endpoint), endpoints, server_name or endpoint.host)
        return cls(
            _ip_list_target(text, endpoints), endpoints, server_name or _shared_host(endpoints)
        )

    def require_certificate_name(self) -> str:
        """The name TLS checks; raises AddressError for a list of different hosts."""
        if self.certificate_name is None:
            hosts = ", ".join(sorted({endpoint.host for endpoint in self.endpoints}))
            raise AddressError(
                f"the coordinators {hosts} are different hosts: give --server-name, the name "
                "their TLS certificate carries"
            )
        return self.certificate_name


def _ip_or_refuse(host: str, message: str) -> int:
    try:
        return ipaddress.ip_address(host).version
    except ValueError:
        raise AddressError(message) from None


def _endpoint(entry: str) -> Endpoint:
    if entry.startswith("["):
        host, bracket, rest = entry[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise AddressError(f"{entry!r}: an IPv6 address is written [address]:port")
        if _ip_or_refuse(host, f"{entry!r}: {host!r} is not an IPv6 address") != 6:
            raise AddressError(f"{entry!r}: only IPv6 addresses go in brackets")
        port = rest[1:]
    else:
        host, colon, port = entry.rpartition(":")
        if not colon or not host:
            raise AddressError(f"{entry!r} has no port: write host:port")
        if ":" in host:
            raise AddressError(f"{entry!r}: write an IPv6 address in brackets, [address]:port")
        if not _name_pattern.fullmatch(host):
            raise AddressError(f"{entry!r}: {host!r} is not a DNS name or IP address")
    if not _port_pattern.fullmatch(port) or not 1 <= int(port) <= 65535:
        raise AddressError(f"{entry!r}: the port must be a number from 1 to 65535")
    return Endpoint(host, int(port))


def _ip_list_target(text: str, endpoints: tuple[Endpoint, ...]) -> str:
    versions = {endpoint.ip_version for endpoint in endpoints}
    if None in versions:
        names = ", ".join(e.host for e in endpoints if e.ip_version is None)
        raise AddressError(
            f"--server {text!r} lists DNS names ({names}): a list takes IP addresses only; to "
            "name several coordinators by DNS, give one name that resolves to all of them"
        )
    if versions == {4, 6}:
        raise AddressError(f"--server {text!r} mixes IPv4 and IPv6: list one family")
    if len(set(endpoints)) != len(endpoints):
        raise AddressError(f"--server {text!r} lists an address twice")
    [version] = versions
    return f"ipv{version}:" + ",".join(str(endpoint) for endpoint in endpoints)


def _shared_host(endpoints: tuple[Endpoint, ...]) -> str | None:
    hosts = {endpoint.host for endpoint in endpoints}
    return hosts.pop() if len(hosts) == 1 else None


def _dns_target_endpoint(text: str) -> Endpoint:
    """The name and port of `dns:[//dns-server/]host:port`."""
    rest = text.removeprefix("dns:")
    if rest.startswith("//"):
        _, slash, rest = rest[2:].partition("/")
        if not slash:
            raise AddressError(f"{text!r}: write dns://dns-server/host:port or dns:///host:port")
    endpoint = _endpoint(rest)
    if endpoint.ip_version is not None:
        raise AddressError(f"{text!r}: a dns: target names a host, not an IP address")
    return endpoint

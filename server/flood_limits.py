"""Limits against floods and Sybils: source networks, rate limits, retry-window memory.

One client with many enrolled keys is still one client on one network. So the coordinator
groups devices by the network they connect from (an IPv4 /24 or an IPv6 /48 by default) and
  - rate-limits enrollments per network and per credential (`RateLimiter`);
  - caps the share of a round's slots one network can take (a task setting,
    `max_network_share`; see `network_slot_cap`);
  - counts at most `counted_devices_per_network` devices of one network towards pace
    steering's population size, so a flood of identities does not stretch every honest
    device's retry window (`activity_key`).
And it remembers the retry window each device was given (`RetryWindowMemory`): a device that
comes back before its window opens is not selected.

Networks the operator lists as exempt (e.g. 127.0.0.0/8 for an emulated fleet on one host)
escape the network limits; nothing is exempt by default. In-process callers (no peer) are not
limited either. Behind a proxy every device would share the proxy's address: the coordinator
does not read forwarded-for headers, so it must face devices directly.
"""

from __future__ import annotations

import dataclasses
import heapq
import ipaddress
import math
from typing import Protocol

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# For an emulated fleet whose phones all connect from this host (tests, demo, emulator).
LOOPBACK_NETWORKS = ("127.0.0.0/8", "::1/128")


@dataclasses.dataclass(frozen=True)
class RateLimit:
    per_s: float  # sustained rate
    burst: float  # bucket size: how many at once after a quiet spell


@dataclasses.dataclass(frozen=True)
class NetworkSettings:
    ipv4_prefix: int = 24
    ipv6_prefix: int = 48
    exempt: tuple[str, ...] = ()  # CIDR blocks the network limits do not apply to
    # Enrollments: a network gets 20 at once, then one every 6 minutes; a credential (e.g. a
    # population's shared secret, used by every honest install) 10,000 at once, then 100/s.
    enroll_per_network: RateLimit = RateLimit(per_s=10 / 3600, burst=20)
    enroll_per_credential: RateLimit = RateLimit(per_s=100.0, burst=10_000)
    counted_devices_per_network: int = 8
    max_tracked_keys: int = 100_000  # rate-limit buckets kept (the oldest full ones go first)

    def exempt_networks(self) -> list[IPNetwork]:
        return [ipaddress.ip_network(block, strict=False) for block in self.exempt]


def peer_address(peer: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address in a gRPC peer string ("ipv4:1.2.3.4:5", "ipv6:[::1]:5"), or None."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        host = rest.rsplit(":", 1)[0]
    elif kind == "ipv6":
        host = rest.rsplit(":", 1)[0].strip("[]").split("%", 1)[0]
    else:
        return None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    # An IPv4 client of a dual-stack listener may show up as ::ffff:a.b.c.d.
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return mapped or address


class SourceNetworks:
    def __init__(self, settings: NetworkSettings) -> None:
        self.settings = settings
        self._exempt = settings.exempt_networks()

    def of(self, peer: str) -> str | None:
        """The network a peer belongs to ("10.1.2.0/24"), or None when no limit applies
        (in-process callers, unix sockets, exempt networks)."""
        address = peer_address(peer)
        if address is None or any(address in block for block in self._exempt):
            return None
        prefix = self.settings.ipv4_prefix if address.version == 4 else self.settings.ipv6_prefix
        return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))

    def activity_key(self, device_id: str, network: str | None) -> str:
        """What pace steering counts for this device: itself, or one of at most
        `counted_devices_per_network` buckets of its network."""
        if network is None:
            return device_id
        bucket = int(device_id[:8], 16) % self.settings.counted_devices_per_network
        return f"{network}#{bucket}"


def network_slot_cap(max_network_share: float, selection_quota: int) -> int:
    """Slots of a round one network may take: the share of the quota, at least one. A share
    of 1 (or more) means no cap."""
    if max_network_share >= 1.0:
        return selection_quota
    return max(1, math.floor(max_network_share * selection_quota))


class TokenBuckets(Protocol):
    """Rate limits per key: RateLimiter in memory, or SharedRateLimiter in PostgreSQL."""

    def __len__(self) -> int: ...  # buckets held in this process's memory

    def try_take(self, key: str, now: float) -> bool: ...


class RateLimiter:
    """Token buckets per key, with bounded memory: past `max_keys` the bucket that was idle
    longest is dropped (it had refilled the most, so forgetting it forgives the least)."""

    def __init__(self, limit: RateLimit, max_keys: int) -> None:
        self._limit = limit
        self._max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, updated_at)

    def __len__(self) -> int:
        return len(self._buckets)

    def try_take(self, key: str, now: float) -> bool:
        tokens, updated = self._buckets.pop(key, (self._limit.burst, now))
        tokens = min(self._limit.burst, tokens + (now - updated) * self._limit.per_s)
        taken = tokens >= 1.0
        self._buckets[key] = (tokens - 1.0 if taken else tokens, now)  # re-inserted: newest
        if len(self._buckets) > self._max_keys:
            del self._buckets[next(iter(self._buckets))]
        return taken


class RetryWindowMemory:
    """When each device may next check in, for the devices whose window has not opened yet.

    Bounded: entries leave when their window opens; past `max_devices` the one opening
    soonest is forgotten first (the device is then treated as on time).
    """

    def __init__(self, max_devices: int = 200_000, tolerance_s: float = 1.0) -> None:
        self._max_devices = max_devices
        self._tolerance_s = tolerance_s
        self._opens_at: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._opens_at)

    def entries(self) -> int:
        """Everything held: the windows, and the heap that expires them."""
        return len(self._opens_at) + len(self._heap)

    def remember(self, device_id: str, now: float, min_delay_s: float) -> None:
        opens_at = now + max(0.0, min_delay_s) - self._tolerance_s
        self._expire(now)
        if opens_at <= now:
            self._opens_at.pop(device_id, None)
            return
        self._opens_at[device_id] = opens_at
        heapq.heappush(self._heap, (opens_at, device_id))
        while len(self._opens_at) > self._max_devices:
            self._pop_soonest()
        # A device told a new window before its old one opened leaves a stale heap entry
        # (when windows are not enforced, on every check-in); rebuild before they pile up.
        if len(self._heap) > 2 * len(self._opens_at) + 1024:
            self._heap = [(at, device) for device, at in self._opens_at.items()]
            heapq.heapify(self._heap)

    def too_early(self, device_id: str, now: float) -> float:
        """Seconds until the device's window opens; 0 when it is on time."""
        opens_at = self._opens_at.get(device_id)
        if opens_at is None or opens_at <= now:
            return 0.0
        return opens_at - now

    def _expire(self, now: float) -> None:
        while self._heap and self._heap[0][0] <= now:
            self._pop_soonest()

    def _pop_soonest(self) -> None:
        opens_at, device_id = heapq.heappop(self._heap)
        # A device told a later window since has a newer entry; only drop the current one.
        if self._opens_at.get(device_id) == opens_at:
            del self._opens_at[device_id]

"""The SecAgg+ neighbour graph: a k-regular Harary graph over a random ordering of clients.

Bell et al. (CCS 2020) show that sharing keys with k = O(log n) random neighbours, instead of
with all n - 1 other devices, keeps the protocol secure and correct with overwhelming
probability. As FCP's "subgraph" variant does, we lay the clients on a ring in an order the
server draws at random per round, and connect each to the k/2 nearest on either side. The
order comes from SHA-256(graph_seed || client_id), so every device computes its own neighbours
from the seed and needs no list from the server (which could otherwise choose them).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable


def ring_order(graph_seed: bytes, client_ids: Iterable[int]) -> list[int]:
    """Client ids in the round's random ring order."""
    return sorted(
        client_ids, key=lambda c: hashlib.sha256(graph_seed + struct.pack(">I", c)).digest()
    )


class NeighbourGraph:
    """Who shares keys with whom. Symmetric; nobody is their own neighbour."""

    def __init__(self, graph_seed: bytes, num_clients: int, num_neighbours: int) -> None:
        if num_clients < 2:
            raise ValueError(f"secure aggregation needs at least 2 clients, got {num_clients}")
        complete = num_neighbours == num_clients - 1
        if not complete and (num_neighbours % 2 or not 2 <= num_neighbours < num_clients):
            raise ValueError(
                f"num_neighbours {num_neighbours} must be even and in [2, {num_clients - 1}), "
                f"or num_clients - 1 (the complete graph)"
            )
        self.num_clients = num_clients
        self.num_neighbours = num_neighbours
        self._complete = complete
        # Neighbour sets are computed on demand: a device needs only its own.
        self._order = [] if complete else ring_order(graph_seed, range(1, num_clients + 1))
        self._position = {c: p for p, c in enumerate(self._order)}
        self._cache: dict[int, frozenset[int]] = {}

    def neighbours(self, client_id: int) -> frozenset[int]:
        """Raises KeyError for an id outside [1, num_clients]."""
        cached = self._cache.get(client_id)
        if cached is not None:
            return cached
        if not 1 <= client_id <= self.num_clients:
            raise KeyError(client_id)
        if self._complete:
            result = frozenset(range(1, self.num_clients + 1)) - {client_id}
        else:
            position, half = self._position[client_id], self.num_neighbours // 2
            result = frozenset(
                self._order[(position + offset) % self.num_clients]
                for offset in range(-half, half + 1)
                if offset != 0
            )
        self._cache[client_id] = result
        return result

    def are_neighbours(self, a: int, b: int) -> bool:
        return 1 <= a <= self.num_clients and b in self.neighbours(a)

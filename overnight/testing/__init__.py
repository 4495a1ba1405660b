"""`overnight.testing`: end-to-end tests of your own model on an emulated fleet, in your CI.

A pytest plugin. Enable it in a `conftest.py` (or the test file itself):

    pytest_plugins = ["overnight.testing"]

Fixtures:
  overnight_coordinator  a real coordinator on loopback (TLS, operator token, enrolled
                         devices, SQLite), torn down after the test. `.connect()` gives an
                         `overnight.Client`; `.fleet(population, clients)` emulated phones.

    def test_my_model_learns(overnight_coordinator):
        client = overnight_coordinator.connect()
        task = client.create_task("t", population="phones", model=model_fn, ...)
        run = overnight_coordinator.fleet("phones", clients).run_task(task)
        assert len(run.committed) == 3

Outside pytest, `overnight.testing.local_deployment(population, clients)` is the same
coordinator and fleet as a context manager for a script (the examples/ use it).

Held-out metrics (`eval/accuracy`, `eval/loss`) need test data: override the
`overnight_held_out` fixture to return a `LocalExamples`.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

__all__ = [
    "EmulatedFleet",
    "FederatedRun",
    "LocalCoordinator",
    "PhoneRecord",
    "TestCoordinator",
    "local_deployment",
]


def __getattr__(name: str) -> Any:
    # The plugin module loads with pytest; the coordinator and emulator only when used.
    if name == "LocalCoordinator":
        from overnight.testing.coordinator import LocalCoordinator

        return LocalCoordinator
    if name in ("EmulatedFleet", "FederatedRun", "PhoneRecord"):
        from overnight.testing import fleet

        return getattr(fleet, name)
    if name == "local_deployment":
        from overnight.testing.local_deployment import local_deployment

        return local_deployment
    raise AttributeError(f"module 'overnight.testing' has no attribute {name!r}")


class TestCoordinator:
    """What the `overnight_coordinator` fixture yields: a running `LocalCoordinator` and a
    way to emulate phones against it."""

    __test__ = False  # not a test class, whatever pytest's name rules say

    def __init__(self, local: Any) -> None:
        self.local = local
        self.admin_address: str = local.admin_address
        self.address: str = local.address
        self.credentials = local.credentials

    def connect(self) -> Any:
        """An `overnight.Client` on this coordinator, as an operator."""
        return self.local.connect()

    def fleet(self, population: str, clients: Sequence[Any], **options: Any) -> Any:
        """An `EmulatedFleet` of `len(clients)` phones; options: seed, conditions,
        conditions_of (see overnight.testing.fleet)."""
        from overnight.testing.fleet import EmulatedFleet

        return EmulatedFleet(self.local, population, clients, **options)


@pytest.fixture
def overnight_held_out() -> Any:
    """The coordinator's held-out data (a `LocalExamples`), or None. Override it to get
    `eval/accuracy` and `eval/loss` in every committed round's metrics."""
    return None


@pytest.fixture
def overnight_coordinator(
    tmp_path_factory: pytest.TempPathFactory, overnight_held_out: Any
) -> Iterator[TestCoordinator]:
    from overnight.testing.coordinator import LocalCoordinator

    data_dir: pathlib.Path = tmp_path_factory.mktemp("overnight-coordinator")
    local = LocalCoordinator(data_dir, held_out=overnight_held_out).start()
    try:
        yield TestCoordinator(local)
    finally:
        local.stop()

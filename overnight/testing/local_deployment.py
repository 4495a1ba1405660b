"""A coordinator and an emulated fleet on this machine, for a script or a notebook.

What the `overnight_coordinator` fixture gives a test, as a context manager: a real
coordinator on loopback (TLS from a throwaway CA, an operator token, SQLite) and phones running
the real device runtime in the background, while the caller drives the Python API itself:

    with local_deployment("phones", clients, held_out=test) as local:
        task = local.client.create_task("t", population="phones", model=model_fn, ...)
        with local.phones():
            for result in task.rounds():
                print(result.round_number, result.tff_metrics)
"""

from __future__ import annotations

import contextlib
import pathlib
import tempfile
from collections.abc import Iterator, Sequence

from device_runtime.examples import LocalExamples
from overnight.client import Client
from overnight.testing.coordinator import LocalCoordinator
from overnight.testing.fleet import EmulatedFleet


class LocalDeployment:
    """What `local_deployment` yields: `client`, an `overnight.Client` on the coordinator, and
    `phones()`, the emulated fleet running for the duration of a block."""

    def __init__(self, client: Client, fleet: EmulatedFleet) -> None:
        self.client = client
        self.fleet = fleet

    def phones(self) -> contextlib.AbstractContextManager[EmulatedFleet]:
        """The phones check in while the block runs. Enter it once the task exists: a phone
        whose population has no task yet backs off, as a real one would, and the first round
        would wait out that backoff."""
        return self.fleet.running()


@contextlib.contextmanager
def local_deployment(
    population: str,
    clients: Sequence[LocalExamples],
    *,
    held_out: LocalExamples | None = None,
    seed: int = 0,
) -> Iterator[LocalDeployment]:
    """A fresh coordinator on loopback and `len(clients)` emulated phones (one dataset each)
    of `population`, torn down when the block ends.

    Args:
      population: the population the phones check in to; tasks created for it train on them.
      clients: each phone's local examples.
      held_out: the coordinator's held-out data: `eval/accuracy` and `eval/loss` in every
        committed round's metrics.
      seed: the coordinator's and the phones' randomness.
    """
    with tempfile.TemporaryDirectory(prefix="overnight-local-") as data_dir:
        local = LocalCoordinator(pathlib.Path(data_dir), held_out=held_out, seed=seed).start()
        try:
            with local.connect() as client:
                yield LocalDeployment(client, EmulatedFleet(local, population, clients, seed=seed))
        finally:
            local.stop()

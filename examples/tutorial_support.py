"""What the examples share: their options, where their data comes from, which coordinator
trains, and TFF's way of printing sizes. Nothing here is needed to use the API; each example
reads top to bottom like the tutorial it mirrors.

Data: TFF's federated EMNIST `.h5` files when `--emnist-dir` holds them (what
`tff.simulation.datasets.emnist.load_data()` caches in ~/.keras/datasets), otherwise the 8x8
digits shipped inside scikit-learn. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import pathlib
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's start-up chatter

import overnight  # noqa: E402
from device_runtime.examples import LocalExamples  # noqa: E402
from emulator.data import federated_digits  # noqa: E402
from emulator.federated_files import EmnistH5Clients  # noqa: E402

# Writers of TFF's test file pooled into the coordinator's held-out set: enough for a steady
# accuracy, few enough to evaluate after every round.
HELD_OUT_WRITERS = 30


def parser(description: str, *, rounds: int, phones: int) -> argparse.ArgumentParser:
    """The options every example takes, with the tutorial's own round and client counts."""
    options = argparse.ArgumentParser(description=description)
    options.add_argument("--quick", action="store_true", help="a few rounds, phones, small model")
    options.add_argument("--rounds", type=int, default=rounds, help="rounds to commit")
    options.add_argument("--phones", type=int, default=phones, help="emulated phones (clients)")
    options.add_argument("--seed", type=int, default=0)
    options.add_argument(
        "--emnist-dir",
        type=pathlib.Path,
        help="a folder holding TFF's fed_emnist*_{train,test}.h5 (else the shipped digits)",
    )
    options.add_argument(
        "--server",
        help="a running coordinator's admin host:port; its own phones train (default: start "
        "a coordinator and emulated phones on this machine)",
    )
    options.add_argument("--admin-token-file", help="with --server: file holding an admin token")
    options.add_argument("--root-certs", help="with --server: CA certificates (PEM)")
    options.add_argument("--insecure", action="store_true", help="with --server: no TLS")
    options.add_argument(
        "--population", default="tutorial", help="the phones' population (with --server)"
    )
    return options


@dataclasses.dataclass(frozen=True)
class TutorialData:
    clients: list[LocalExamples]  # one per phone
    test: LocalExamples  # the coordinator's held-out set
    num_classes: int

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.clients[0].x.shape[1:])


def load(args: argparse.Namespace, *, only_digits: bool = True, alpha: float = 0.5) -> TutorialData:
    """The tutorial's data, and a first line saying which it is."""
    if args.emnist_dir is not None:
        prefix = "fed_emnist_digitsonly" if only_digits else "fed_emnist"
        train = EmnistH5Clients(args.emnist_dir / f"{prefix}_train.h5")
        test = EmnistH5Clients(args.emnist_dir / f"{prefix}_test.h5")
        writers = min(HELD_OUT_WRITERS, len(test.client_ids()))
        held_out = [test.client(i) for i in range(writers)]
        data = TutorialData(
            clients=[train.client(i) for i in range(args.phones)],
            test=LocalExamples(
                np.concatenate([w.x for w in held_out]), np.concatenate([w.y for w in held_out])
            ),
            num_classes=10 if only_digits else 62,
        )
        print(
            f"data: TFF's federated EMNIST ({prefix}, {args.emnist_dir}), one writer per phone "
            f"({args.phones} phones), {writers} test writers held out",
            flush=True,
        )
        return data
    digits = federated_digits(args.phones, alpha=alpha, seed=args.seed)
    print(
        "data: the 8x8 digits shipped with scikit-learn (no --emnist-dir), split non-IID "
        f"(Dirichlet alpha={alpha}) over {args.phones} phones",
        flush=True,
    )
    return TutorialData(clients=digits.clients, test=digits.test, num_classes=10)


class Deployment:
    """`client` on the coordinator, and `phones()`: the block during which phones train.

    Started here, the emulated phones run only inside `phones()` (entered once the task
    exists, so none backs off waiting for it). With `--server`, the coordinator's own phones
    train whenever they check in, and `phones()` does nothing."""

    def __init__(self, client: overnight.Client, local: Any = None) -> None:
        self.client = client
        self._local = local

    def phones(self) -> contextlib.AbstractContextManager[object]:
        return self._local.phones() if self._local is not None else contextlib.nullcontext()


@contextlib.contextmanager
def coordinator(args: argparse.Namespace, data: TutorialData) -> Iterator[Deployment]:
    """`--server`, or a coordinator started here (TLS and an operator token, as in production)
    with one emulated phone per client dataset."""
    if args.server:
        print(
            f"coordinator: {args.server}; its phones of population {args.population!r} train on "
            "their own data (the data above sets the model's input and the final evaluation)"
        )
        credentials = overnight.Credentials(
            token_file=args.admin_token_file,
            root_certificates=args.root_certs,
            insecure=args.insecure,
        )
        with overnight.connect(args.server, credentials=credentials) as client:
            yield Deployment(client)
        return
    from overnight.testing.local_deployment import local_deployment

    print(f"coordinator: started on this machine over TLS, {len(data.clients)} emulated phones")
    with local_deployment(
        args.population, data.clients, held_out=data.test, seed=args.seed
    ) as local:
        yield Deployment(local.client, local)


@dataclasses.dataclass(frozen=True)
class Deadlines:
    selection_s: float
    reporting_s: float


def deadlines(args: argparse.Namespace) -> Deadlines:
    """The rounds' deadlines. Quick runs are small fleets on one machine: short deadlines,
    because the coordinator tells phones to come back after a share of them."""
    if args.quick:
        return Deadlines(selection_s=10.0, reporting_s=30.0)
    return Deadlines(selection_s=60.0, reporting_s=120.0)


def task_id(name: str) -> str:
    """A fresh task name per run, so a script can run again on the same coordinator."""
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def format_size(bits: float) -> str:
    """Bits as the compression tutorial prints them (507.62Mibit, 1.49Gibit)."""
    for unit, size in (("Gibit", 2**30), ("Mibit", 2**20), ("Kibit", 2**10)):
        if bits >= size:
            return f"{bits / size:.2f}{unit}"
    return f"{bits:.2f}bit"

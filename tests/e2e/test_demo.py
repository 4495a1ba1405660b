"""End to end: `overnight demo` (coordinator + 10 emulated phones + 3 rounds over real gRPC)."""

from __future__ import annotations

import asyncio
import pathlib
import sqlite3
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from device_runtime.model_runner import TrainableModel
from emulator.data import federated_digits
from overnight.demo import DemoSettings, run_demo

pytestmark = pytest.mark.e2e


def test_three_rounds_raise_accuracy_and_count_every_report(tmp_path: pathlib.Path) -> None:
    settings = DemoSettings(
        phones=10, rounds=3, clients_per_round=5, seed=3, data_dir=str(tmp_path)
    )
    printed = []

    result = asyncio.run(run_demo(settings, printed.append))

    committed = [r for r in result.rounds if r.state == "committed"]
    assert len(committed) == 3
    assert [r.round_number for r in printed] == [r.round_number for r in result.rounds]
    # Accuracy rises: above the untrained model, and the last round above the first.
    test = federated_digits(10, seed=3).test
    initial = TrainableModel((tmp_path / "digits_mlp.tflite").read_bytes()).evaluate(test.x, test.y)
    accuracies = [r.metrics["eval/accuracy"] for r in committed]
    assert accuracies[-1] > accuracies[0]
    assert accuracies[-1] > initial.accuracy + 0.2
    # Every committed round has exactly the reports it claims, each counted once.
    with sqlite3.connect(tmp_path / "coordinator.sqlite") as db:
        counted = dict(
            db.execute(
                "SELECT round_number, COUNT(*) FROM counted_uploads GROUP BY round_number"
            ).fetchall()
        )
    for r in committed:
        assert counted[r.round_number] == r.reported == 5
        assert r.metrics["aggregator/num_reports"] == 5
    # Bytes that crossed the wire grow round over round.
    bits = [r.metrics["aggregated_bits"] for r in committed]
    assert bits == sorted(bits) and bits[0] >= 5 * 32 * result.num_parameters


def test_metrics_page_counts_the_demo_while_it_runs(tmp_path: pathlib.Path) -> None:
    settings = DemoSettings(
        phones=6,
        rounds=2,
        clients_per_round=3,
        seed=3,
        data_dir=str(tmp_path),
        metrics_address="127.0.0.1:0",
    )
    addresses: list[str] = []
    pages: list[str] = []

    def scrape(_: object) -> None:  # after each round, while the coordinator still serves
        with urllib.request.urlopen(f"http://{addresses[0]}/metrics") as page:
            pages.append(page.read().decode())

    asyncio.run(run_demo(settings, scrape, addresses.append))

    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(pages[-1])
        for s in family.samples
    }
    assigned = samples[
        (
            "overnight_check_ins_total",
            (("outcome", "assigned"), ("population", "digits"), ("reason", "")),
        )
    ]
    assert assigned >= 3
    committed = (("outcome", "committed"), ("task", "digits-mlp"))
    assert samples[("overnight_rounds_total", committed)] >= 1

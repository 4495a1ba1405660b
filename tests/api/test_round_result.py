"""Round results as the API yields them: TFF's nested metrics; `import overnight` stays light."""

from __future__ import annotations

import subprocess
import sys

from overnight.round_result import RoundResult
from protos import admin_pb2


def test_metrics_nest_as_tff_learning_returns_them() -> None:
    summary = admin_pb2.RoundSummary(
        round_number=2,
        state="committed",
        metrics={
            "client_work/train/loss": 0.5,
            "client_work/train/accuracy": 0.75,
            "aggregator/zeroing/zeroing_norm": 21.0,
            "broadcasted_bits": 800.0,
        },
    )

    nested = RoundResult.from_summary(summary).tff_metrics

    assert nested["client_work"]["train"] == {"accuracy": 0.75, "loss": 0.5}
    assert nested["aggregator"]["zeroing"]["zeroing_norm"] == 21.0
    assert nested["distributor"] == () and nested["finalizer"] == ()
    assert nested["broadcasted_bits"] == 800.0


def test_import_overnight_loads_neither_tensorflow_nor_the_coordinator() -> None:
    probe = (
        "import sys, overnight, overnight.cli; "
        "print(sorted(m for m in ('tensorflow', 'server', 'tflite_export') if m in sys.modules))"
    )

    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.strip()

    assert loaded == "[]"


def test_the_api_itself_imports_without_tensorflow() -> None:
    probe = "import sys, overnight; overnight.connect; print('tensorflow' in sys.modules)"

    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.strip()

    assert loaded == "False"

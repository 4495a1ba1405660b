"""Overnight: federated learning on real devices, for people who know TFF.

    import overnight
    client = overnight.connect("127.0.0.1:50052", credentials=overnight.Credentials(...))
    task = client.create_task("digits", population="phones", model=model_fn, ...)
    for result in task.rounds():
        print(result.round_number, result.tff_metrics)

`import overnight` loads nothing heavy: the device runtime installs this package without
TensorFlow or the coordinator's extras, and each name below is imported on first use.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

# The API needs Python 3.11 (the coordinator's and the exporter's); the device install, on
# 3.10 too, type-checks without it.
if TYPE_CHECKING and sys.version_info >= (3, 11):
    from overnight.admin_calls import AdminError
    from overnight.client import Client, Credentials, Eligibility, connect
    from overnight.round_result import RoundResult
    from overnight.task import Evaluation, Task
    from overnight.tff_translation.errors import NotTranslatable

_HOMES = {
    "connect": "overnight.client",
    "Client": "overnight.client",
    "Credentials": "overnight.client",
    "Eligibility": "overnight.client",
    "Task": "overnight.task",
    "Evaluation": "overnight.task",
    "RoundResult": "overnight.round_result",
    "AdminError": "overnight.admin_calls",
    "NotTranslatable": "overnight.tff_translation.errors",
}
__all__ = [
    "AdminError",
    "Client",
    "Credentials",
    "Eligibility",
    "Evaluation",
    "NotTranslatable",
    "RoundResult",
    "Task",
    "connect",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'overnight' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)

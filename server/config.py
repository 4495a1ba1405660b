"""Task configuration: validation, TOML files and the wire form."""

from __future__ import annotations

import dataclasses
import math
import pathlib
import tomllib
from typing import Any

from protos import admin_pb2, common_pb2
from server.errors import InvalidArgument


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    task_id: str
    population: str
    total_rounds: int = 10
    target_reports: int = 10
    over_selection: float = 1.3  # production fleets lose 6-10% of selected devices mid-round
    min_reports: int = 0  # 0 = target_reports
    selection_deadline_s: float = 60.0
    reporting_deadline_s: float = 120.0
    epochs: int = 1
    batch_size: int = 20
    max_examples: int = 0
    server_learning_rate: float = 1.0
    aggregator: str = "mean"  # expression: server/aggregators/expression.py

    @property
    def effective_min_reports(self) -> int:
        return self.min_reports or self.target_reports

    @property
    def selection_quota(self) -> int:
        return math.ceil(self.target_reports * self.over_selection)

    def validate(self) -> TaskConfig:
        def need(ok: bool, field: str, why: str) -> None:
            if not ok:
                raise InvalidArgument(f"task config field {field!r}: {why}")

        need(
            bool(self.task_id) and self.task_id.replace("-", "").replace("_", "").isalnum(),
            "task_id",
            f"must be a non-empty name of letters, digits, '-' or '_', got {self.task_id!r}",
        )
        need(bool(self.population), "population", "must be set")
        need(self.total_rounds >= 1, "total_rounds", f"must be >= 1, got {self.total_rounds}")
        need(self.target_reports >= 1, "target_reports", f"must be >= 1, got {self.target_reports}")
        need(
            self.over_selection >= 1.0,
            "over_selection",
            f"must be >= 1.0, got {self.over_selection}",
        )
        need(
            0 <= self.min_reports <= self.target_reports,
            "min_reports",
            f"must be between 0 and target_reports ({self.target_reports}), got {self.min_reports}",
        )
        need(self.selection_deadline_s > 0, "selection_deadline_s", "must be positive")
        need(self.reporting_deadline_s > 0, "reporting_deadline_s", "must be positive")
        need(self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")
        need(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        need(self.max_examples >= 0, "max_examples", "must be >= 0 (0 = all)")
        need(
            math.isfinite(self.server_learning_rate) and self.server_learning_rate > 0,
            "server_learning_rate",
            f"must be a positive number, got {self.server_learning_rate}",
        )
        from server.aggregators.process import check_aggregator_expression

        check_aggregator_expression(self.aggregator)
        return self

    def plan(self) -> common_pb2.Plan:
        return common_pb2.Plan(
            epochs=self.epochs, batch_size=self.batch_size, max_examples=self.max_examples
        )

    def to_proto(self) -> admin_pb2.TaskConfig:
        return admin_pb2.TaskConfig(
            task_id=self.task_id,
            population=self.population,
            total_rounds=self.total_rounds,
            target_reports=self.target_reports,
            over_selection=self.over_selection,
            min_reports=self.min_reports,
            selection_deadline_s=self.selection_deadline_s,
            reporting_deadline_s=self.reporting_deadline_s,
            plan=self.plan(),
            server_learning_rate=self.server_learning_rate,
            aggregator=self.aggregator,
        )

    @classmethod
    def from_proto(cls, message: admin_pb2.TaskConfig) -> TaskConfig:
        defaults = cls(task_id="", population="")
        return cls(
            task_id=message.task_id,
            population=message.population,
            total_rounds=message.total_rounds or defaults.total_rounds,
            target_reports=message.target_reports or defaults.target_reports,
            over_selection=message.over_selection or defaults.over_selection,
            min_reports=message.min_reports,
            selection_deadline_s=message.selection_deadline_s or defaults.selection_deadline_s,
            reporting_deadline_s=message.reporting_deadline_s or defaults.reporting_deadline_s,
            epochs=message.plan.epochs or defaults.epochs,
            batch_size=message.plan.batch_size or defaults.batch_size,
            max_examples=message.plan.max_examples,
            server_learning_rate=message.server_learning_rate or defaults.server_learning_rate,
            aggregator=message.aggregator or defaults.aggregator,
        ).validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TaskConfig:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise InvalidArgument(
                f"unknown task config field(s) {unknown}; known: {sorted(fields)}"
            )
        for required in ("task_id", "population"):
            if required not in values:
                raise InvalidArgument(f"task config field {required!r} is required")
        converted: dict[str, Any] = {}
        for name, value in values.items():
            kind = type(getattr(cls(task_id="", population=""), name))
            try:
                if kind is int and not (isinstance(value, int) and not isinstance(value, bool)):
                    raise TypeError
                converted[name] = kind(value)
            except (TypeError, ValueError):
                raise InvalidArgument(
                    f"task config field {name!r}: expected {kind.__name__}, got {value!r}"
                ) from None
        return cls(**converted).validate()

    @classmethod
    def from_toml(cls, path: str | pathlib.Path) -> TaskConfig:
        try:
            values = tomllib.loads(pathlib.Path(path).read_text())
        except tomllib.TOMLDecodeError as exc:
            raise InvalidArgument(f"{path}: not valid TOML: {exc}") from exc
        return cls.from_dict(values.get("task", values))

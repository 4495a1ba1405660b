"""Task configuration: validation, TOML files and the wire form."""

from __future__ import annotations

import dataclasses
import math
import pathlib
import tomllib
from typing import Any

from protos import admin_pb2, common_pb2
from server.errors import InvalidArgument
from server.optimizers import OPTIMIZERS, ServerOptimizer


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
    max_concurrent_rounds: int = 1  # >1: the next round selects while this one reports
    # Client plan.
    epochs: int = 1
    batch_size: int = 20
    max_examples: int = 0
    fedprox_mu: float = 0.0
    keep_order: bool = False
    # Server optimizer (TFF's, with TFF's defaults where a field is 0).
    server_optimizer: str = "sgd"
    server_learning_rate: float = 1.0
    server_momentum: float = 0.0
    server_beta_1: float = 0.0
    server_beta_2: float = 0.0
    server_epsilon: float = 0.0
    server_initial_preconditioner: float = 0.0
    # Eligibility.
    min_examples: int = 1
    min_separation_s: float = 0.0
    min_runtime_version: str = ""
    # Sybil limit: share of a round's slots one source network may take (1 = no cap).
    max_network_share: float = 0.1
    # "training", or "evaluation": devices evaluate the latest model of task `evaluates` on
    # their own data and report metrics only (federated evaluation).
    kind: str = "training"
    evaluates: str = ""

    @property
    def is_evaluation(self) -> bool:
        return self.kind == "evaluation"

    aggregator: str = "mean"  # expression: server/aggregators/expression.py

    @property
    def effective_min_reports(self) -> int:
        return self.min_reports or self.target_reports

    @property
    def selection_quota(self) -> int:
        return math.ceil(self.target_reports * self.over_selection)

    def optimizer(self) -> ServerOptimizer:
        overrides = {
            name: value
            for name, value in (
                ("momentum", self.server_momentum),
                ("beta_1", self.server_beta_1),
                ("beta_2", self.server_beta_2),
                ("epsilon", self.server_epsilon),
                ("initial_preconditioner", self.server_initial_preconditioner),
            )
            if value
        }
        return ServerOptimizer.with_tff_defaults(
            self.server_optimizer, self.server_learning_rate, **overrides
        )

    def validate(self) -> TaskConfig:
        def need(ok: bool, field: str, why: str) -> None:
            if not ok:
                raise InvalidArgument(f"task config field {field!r}: {why}")

        name_ok = bool(self.task_id) and self.task_id.replace("-", "").replace("_", "").isalnum()
        need(name_ok, "task_id", f"must be letters, digits, '-' or '_', got {self.task_id!r}")
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
        need(self.max_concurrent_rounds >= 1, "max_concurrent_rounds", "must be >= 1")
        need(self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")
        need(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        need(self.max_examples >= 0, "max_examples", "must be >= 0 (0 = all)")
        need(self.fedprox_mu >= 0, "fedprox_mu", f"must be >= 0, got {self.fedprox_mu}")
        need(
            self.server_optimizer in OPTIMIZERS,
            "server_optimizer",
            f"must be one of {', '.join(OPTIMIZERS)}, got {self.server_optimizer!r}",
        )
        need(
            math.isfinite(self.server_learning_rate) and self.server_learning_rate > 0,
            "server_learning_rate",
            f"must be a positive number, got {self.server_learning_rate}",
        )
        for field in ("server_momentum", "server_epsilon", "server_initial_preconditioner"):
            need(getattr(self, field) >= 0, field, "must be >= 0 (0 = TFF's default)")
        for field in ("server_beta_1", "server_beta_2"):
            need(0 <= getattr(self, field) < 1, field, "must be in [0, 1) (0 = TFF's default)")
        need(
            self.kind in ("training", "evaluation"),
            "kind",
            f"must be 'training' or 'evaluation', got {self.kind!r}",
        )
        need(
            bool(self.evaluates) == self.is_evaluation,
            "evaluates",
            "names the training task an evaluation task tests (and only then)",
        )
        need(self.min_examples >= 1, "min_examples", "must be >= 1")
        need(self.min_separation_s >= 0, "min_separation_s", "must be >= 0")
        need(
            math.isfinite(self.max_network_share) and 0 < self.max_network_share <= 1,
            "max_network_share",
            f"must be in (0, 1] (1 = no cap), got {self.max_network_share}",
        )
        if self.min_runtime_version:
            try:
                parse_version(self.min_runtime_version)
            except ValueError as exc:
                need(False, "min_runtime_version", str(exc))
        from server.aggregators.process import check_aggregator_expression

        check_aggregator_expression(self.aggregator)
        return self

    def plan(self) -> common_pb2.Plan:
        return common_pb2.Plan(
            epochs=self.epochs,
            batch_size=self.batch_size,
            max_examples=self.max_examples,
            fedprox_mu=self.fedprox_mu,
            keep_order=self.keep_order,
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
            max_concurrent_rounds=self.max_concurrent_rounds,
            server_optimizer=admin_pb2.ServerOptimizer(
                name=self.server_optimizer,
                momentum=self.server_momentum,
                beta_1=self.server_beta_1,
                beta_2=self.server_beta_2,
                epsilon=self.server_epsilon,
                initial_preconditioner=self.server_initial_preconditioner,
            ),
            eligibility=admin_pb2.Eligibility(
                min_examples=self.min_examples,
                min_separation_s=self.min_separation_s,
                min_runtime_version=self.min_runtime_version,
            ),
            kind=self.kind,
            evaluates=self.evaluates,
            aggregator=self.aggregator,
            max_network_share=self.max_network_share,
        )

    @classmethod
    def from_proto(cls, message: admin_pb2.TaskConfig) -> TaskConfig:
        """Zero (unset) fields take the defaults."""
        d = cls(task_id="", population="")
        opt, elig, plan = message.server_optimizer, message.eligibility, message.plan
        return cls(
            task_id=message.task_id,
            population=message.population,
            total_rounds=message.total_rounds or d.total_rounds,
            target_reports=message.target_reports or d.target_reports,
            over_selection=message.over_selection or d.over_selection,
            min_reports=message.min_reports,
            selection_deadline_s=message.selection_deadline_s or d.selection_deadline_s,
            reporting_deadline_s=message.reporting_deadline_s or d.reporting_deadline_s,
            max_concurrent_rounds=message.max_concurrent_rounds or d.max_concurrent_rounds,
            epochs=plan.epochs or d.epochs,
            batch_size=plan.batch_size or d.batch_size,
            max_examples=plan.max_examples,
            fedprox_mu=plan.fedprox_mu,
            keep_order=plan.keep_order,
            server_optimizer=opt.name or d.server_optimizer,
            server_learning_rate=message.server_learning_rate or d.server_learning_rate,
            server_momentum=opt.momentum,
            server_beta_1=opt.beta_1,
            server_beta_2=opt.beta_2,
            server_epsilon=opt.epsilon,
            server_initial_preconditioner=opt.initial_preconditioner,
            min_examples=elig.min_examples or d.min_examples,
            min_separation_s=elig.min_separation_s,
            min_runtime_version=elig.min_runtime_version,
            kind=message.kind or d.kind,
            evaluates=message.evaluates,
            aggregator=message.aggregator or d.aggregator,
            max_network_share=message.max_network_share or d.max_network_share,
        ).validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TaskConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise InvalidArgument(
                f"unknown task config field(s) {unknown}; known: {sorted(fields)}"
            )
        for required in ("task_id", "population"):
            if required not in values:
                raise InvalidArgument(f"task config field {required!r} is required")
        defaults = cls(task_id="", population="")
        converted: dict[str, Any] = {}
        for name, value in values.items():
            kind = type(getattr(defaults, name))
            ok = (
                isinstance(value, bool)
                if kind is bool
                else isinstance(value, int) and not isinstance(value, bool)
                if kind is int
                else isinstance(value, int | float) and not isinstance(value, bool)
                if kind is float
                else isinstance(value, str)
            )
            if not ok:
                raise InvalidArgument(
                    f"task config field {name!r}: expected {kind.__name__}, got {value!r}"
                )
            converted[name] = kind(value)
        return cls(**converted).validate()

    @classmethod
    def from_toml(cls, path: str | pathlib.Path) -> TaskConfig:
        try:
            values = tomllib.loads(pathlib.Path(path).read_text())
        except tomllib.TOMLDecodeError as exc:
            raise InvalidArgument(f"{path}: not valid TOML: {exc}") from exc
        except OSError as exc:
            raise InvalidArgument(f"cannot read task config {path}: {exc.strerror}") from exc
        return cls.from_dict(values.get("task", values))


def parse_version(text: str) -> tuple[int, ...]:
    """'1.2.3' -> (1, 2, 3). Raises ValueError naming the text."""
    try:
        parts = tuple(int(p) for p in text.split("."))
    except ValueError:
        raise ValueError(f"version {text!r} is not dotted integers like 0.1.0") from None
    if not parts:
        raise ValueError("empty version")
    return parts

"""Task configuration: validation, TOML files and the wire form."""

from __future__ import annotations

import dataclasses
import math
import pathlib
import tomllib
from typing import Any

from protos import admin_pb2, common_pb2
from server import limits
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
    # The largest example count (weight) the coordinator credits one device's update with;
    # it also never credits more than the device declared at check-in.
    max_examples_per_device: int = limits.default_max_examples_per_device
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
        """Checks every field: each number finite and in its range (server/limits.py).
        Raises InvalidArgument naming the field."""

        def need(ok: bool, field: str, why: str) -> None:
            if not ok:
                raise InvalidArgument(f"task config field {field!r}: {why}")

        def integer(field: str, low: int, high: int, note: str = "") -> None:
            value = getattr(self, field)
            ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
            need(ok, field, f"must be an integer in [{low}, {high}]{note}, got {value!r}")

        def number(field: str, low: float, high: float, low_open: bool = False) -> None:
            value = getattr(self, field)
            ok = (
                isinstance(value, int | float)
                and not isinstance(value, bool)
                and math.isfinite(value)
                and (low < value if low_open else low <= value)
                and value <= high
            )
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
            need(ok, field, f"must be a finite number in {interval}, got {value!r}")

        def text(field: str, max_bytes: int) -> None:
            value = getattr(self, field)
            need(isinstance(value, str), field, f"must be a string, got {value!r}")
            need(len(value.encode()) <= max_bytes, field, f"must be at most {max_bytes} bytes")

        text("task_id", limits.max_task_id_bytes)
        name_ok = bool(self.task_id) and self.task_id.replace("-", "").replace("_", "").isalnum()
        need(name_ok, "task_id", f"must be letters, digits, '-' or '_', got {self.task_id!r}")
        text("population", limits.max_population_bytes)
        need(bool(self.population), "population", "must be set")
        integer("total_rounds", 1, limits.max_total_rounds)
        integer("target_reports", 1, limits.max_target_reports)
        number("over_selection", 1.0, limits.max_over_selection)
        integer("min_reports", 0, self.target_reports, " (0 = target_reports)")
        number("selection_deadline_s", 0.0, limits.max_deadline_s, low_open=True)
        number("reporting_deadline_s", 0.0, limits.max_deadline_s, low_open=True)
        integer("max_concurrent_rounds", 1, limits.max_concurrent_rounds)
        integer("epochs", 1, limits.max_epochs)
        integer("batch_size", 1, limits.max_batch_size)
        integer("max_examples", 0, limits.max_examples_per_device, " (0 = all)")
        integer("max_examples_per_device", 1, limits.max_examples_per_device)
        number("fedprox_mu", 0.0, limits.max_optimizer_parameter)
        need(
            isinstance(self.keep_order, bool),
            "keep_order",
            f"must be a bool, got {self.keep_order!r}",
        )
        text("server_optimizer", limits.max_version_string_bytes)
        need(
            self.server_optimizer in OPTIMIZERS,
            "server_optimizer",
            f"must be one of {', '.join(OPTIMIZERS)}, got {self.server_optimizer!r}",
        )
        number("server_learning_rate", 0.0, limits.max_optimizer_parameter, low_open=True)
        for field in ("server_momentum", "server_epsilon", "server_initial_preconditioner"):
            number(field, 0.0, limits.max_optimizer_parameter)  # 0 = TFF's default
        for field in ("server_beta_1", "server_beta_2"):
            number(field, 0.0, 1.0)
            need(getattr(self, field) < 1, field, "must be in [0, 1) (0 = TFF's default)")
        text("kind", limits.max_version_string_bytes)
        need(
            self.kind in ("training", "evaluation"),
            "kind",
            f"must be 'training' or 'evaluation', got {self.kind!r}",
        )
        text("evaluates", limits.max_task_id_bytes)
        need(
            bool(self.evaluates) == self.is_evaluation,
            "evaluates",
            "names the training task an evaluation task tests (and only then)",
        )
        integer("min_examples", 1, limits.max_examples_per_device)
        number("min_separation_s", 0.0, limits.max_separation_s)
        text("min_runtime_version", limits.max_version_string_bytes)
        # 1 = no cap; a share of 0 would leave no slot for anyone.
        number("max_network_share", 0.0, 1.0, low_open=True)
        if self.min_runtime_version:
            try:
                parse_version(self.min_runtime_version)
            except ValueError as exc:
                need(False, "min_runtime_version", str(exc))
        text("aggregator", limits.max_aggregator_expression_bytes)
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
            max_examples_per_device=self.max_examples_per_device,
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
            max_examples_per_device=(message.max_examples_per_device or d.max_examples_per_device),
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

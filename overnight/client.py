"""`overnight.connect(...)`: a coordinator's admin API from Python, for TFF users.

import overnight
client = overnight.connect("127.0.0.1:50052", credentials=overnight.Credentials(
    token_file="state/operator.token", root_certificates="tls/ca.pem"))
task = client.create_task("emnist", population="phones", model=model_fn, ...)
for result in task.rounds():
    print(result.round_number, result.tff_metrics)
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import tempfile
from typing import TYPE_CHECKING, Any

from device_runtime import constants as protocol
from device_runtime.channel import ServerTrust, open_blocking_channel
from overnight.admin_calls import AdminConnection
from overnight.task import Task
from protos import admin_pb2, admin_pb2_grpc
from server import limits
from server.config import TaskConfig
from server.errors import CoordinatorError
from server.grpc_service import admin_max_message_bytes
from server.operator_access import FIRST_TOKEN_FILE, TOKEN_ENV, bearer_metadata, read_admin_token

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Credentials:
    """How to reach a coordinator's admin listener, as `overnight task` does.

    Attributes:
      token: an admin token (operator role to create and control tasks).
      token_file: a file holding the token; without `token` or `token_file`, the
        OVERNIGHT_ADMIN_TOKEN environment variable.
      root_certificates: PEM bytes, or a path to them, of the CA that signed the
        coordinator's certificate; None: the system trust store.
      insecure: plaintext, for a coordinator run with --insecure only.
    """

    token: str | None = None
    token_file: str | pathlib.Path | None = None
    root_certificates: bytes | str | pathlib.Path | None = None
    insecure: bool = False

    def trust(self) -> ServerTrust:
        if isinstance(self.root_certificates, bytes):
            return ServerTrust(root_certificates=self.root_certificates, insecure=self.insecure)
        return ServerTrust.from_files(self.root_certificates, self.insecure)

    def admin_token(self) -> str:
        token = self.token or read_admin_token(str(self.token_file) if self.token_file else None)
        if not token:
            raise ValueError(
                f"needs an admin token: Credentials(token=...), token_file=... or {TOKEN_ENV} "
                f"(serve writes the first one to DATA_DIR/{FIRST_TOKEN_FILE})"
            )
        return token


@dataclasses.dataclass(frozen=True)
class Eligibility:
    """Which devices may take part (FCP's eligibility criteria).

    Attributes:
      min_examples: devices with fewer local examples are turned away.
      min_separation_s: a device joins this task at most once per this many seconds.
      min_runtime_version: e.g. "0.1.0"; "" = any.
      max_examples_per_device: the most examples one update is weighted with.
    """

    min_examples: int = 1
    min_separation_s: float = 0.0
    min_runtime_version: str = ""
    max_examples_per_device: int = limits.default_max_examples_per_device


def connect(admin_address: str, credentials: Credentials | None = None) -> Client:
    """Connects to a coordinator's admin listener (`overnight serve --admin-address`).

    Args:
      admin_address: host:port of the admin listener, e.g. "127.0.0.1:50052".
      credentials: token and CA, as `overnight task --admin-token-file --root-certs`;
        default: the OVERNIGHT_ADMIN_TOKEN environment variable and the system trust store.

    Returns:
      A `Client`. Use it as a context manager, or call `close()`.
    """
    credentials = credentials or Credentials()
    trust = credentials.trust()
    if trust.insecure:
        log.warning("plaintext admin channel (insecure): the token crosses the network in clear")
    channel = open_blocking_channel(
        admin_address, trust, [("grpc.max_send_message_length", admin_max_message_bytes)]
    )
    metadata = bearer_metadata(credentials.admin_token())
    return Client(AdminConnection(channel, admin_pb2_grpc.AdminServiceStub(channel), metadata))


class Client:
    """A coordinator's admin API. Calls raise `overnight.AdminError` with the status code
    protos/admin.proto documents (UNAUTHENTICATED, PERMISSION_DENIED, NOT_FOUND, ...)."""

    def __init__(self, connection: AdminConnection) -> None:
        self._admin = connection

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._admin.channel.close()

    def tasks(self) -> list[admin_pb2.TaskStatus]:
        """Every task on the coordinator."""
        request = admin_pb2.ListTasksRequest(protocol_version=protocol.PROTOCOL_VERSION)
        response: admin_pb2.ListTasksResponse = self._admin.call("ListTasks", request)
        return list(response.tasks)

    def task(self, task_id: str, model: Any = None, model_tflite: bytes | None = None) -> Task:
        """A handle on an existing task. `model` (a Keras model or model_fn) enables
        `keras_model()`, `model_tflite` (the exported file) enables `evaluate()`."""
        builder = _builder(model) if model is not None else None
        handle = Task(self._admin, task_id, model_tflite, builder)
        handle.status()  # NOT_FOUND now rather than at first use
        return handle

    def create_task(
        self,
        task_id: str,
        *,
        population: str,
        model: Any,
        loss: Any,
        client_optimizer: Any,
        server_optimizer: Any = "sgd",
        server_learning_rate: float | None = None,
        aggregator: Any = None,
        rounds: int = 10,
        clients_per_round: int = 10,
        min_clients_per_round: int = 0,
        over_selection: float = 1.3,
        epochs: int = 1,
        batch_size: int = 20,
        selection_deadline_s: float = 60.0,
        reporting_deadline_s: float = 120.0,
        eligibility: Eligibility | None = None,
        max_concurrent_rounds: int = 1,
        keep_order: bool = False,
    ) -> Task:
        """Exports the model for on-device training and registers a FedAvg task.

        Takes the objects a `tff.learning.algorithms.build_weighted_fed_avg` call takes.
        Anything Overnight cannot run exactly as TFF would is refused with
        `overnight.NotTranslatable`, naming the object and what is supported; nothing is
        approximated.

        Args:
          task_id: the task's name (letters, digits, '-', '_').
          population: the devices' population name (they check in with it).
          model: a `tf.keras.Model`, or a no-argument function returning one (a TFF
            `model_fn` without the `tff.learning.models.from_keras_model` wrapping).
          loss: a `tf.keras.losses.Loss` (e.g. `SparseCategoricalCrossentropy()`) or name.
          client_optimizer: `tff.learning.optimizers.build_sgdm(...)` / `build_adam(...)`, a
            Keras SGD or Adam, or a function returning one (TFF's `client_optimizer_fn`).
          server_optimizer: a `tff.learning.optimizers` object (read through
            `get_hparams()`), a Keras SGD or Adam, or a name (sgd, sgdm, adam, yogi,
            adagrad) with `server_learning_rate` (default 1.0). Default: TFF's, SGD at 1.0.
          aggregator: a TFF aggregation factory (`tff.learning.robust_aggregator()`,
            `compression_aggregator()`, `dp_aggregator(...)`, `tff.aggregators.MeanFactory()`
            and zeroing/clipping compositions), an Overnight expression such as
            "secure_aggregator(clip=1.0)", or None: TFF's default weighted mean.
          rounds: committed rounds after which the task completes.
          clients_per_round: reports that close a round (TFF's clients per round).
          min_clients_per_round: fewer at the reporting deadline fail the round (0: all).
          over_selection: devices selected per round = ceil(clients_per_round * this).
          epochs, batch_size: local training per device and round.
          selection_deadline_s, reporting_deadline_s: the round's deadlines.
          eligibility: which devices may take part.
          max_concurrent_rounds: > 1 lets the next round select while one reports.
          keep_order: devices train on their examples in order (no shuffle), for parity runs.

        Returns:
          The registered `Task`.
        """
        from overnight.tff_translation.aggregators import aggregator_expression
        from overnight.tff_translation.models import keras_model, loss_name
        from overnight.tff_translation.optimizers import (
            client_optimizer as client_plan_of,
        )
        from overnight.tff_translation.optimizers import (
            server_optimizer as server_plan_of,
        )
        from tflite_export.exporter import export_model

        built = keras_model(model)
        loss_key = loss_name(loss, built)
        client_plan = client_plan_of(client_optimizer)
        server_plan = server_plan_of(server_optimizer, server_learning_rate)
        expression = aggregator_expression(aggregator)
        rules = eligibility or Eligibility()
        try:
            config = TaskConfig(
                task_id=task_id,
                population=population,
                total_rounds=rounds,
                target_reports=clients_per_round,
                min_reports=min_clients_per_round,
                over_selection=over_selection,
                selection_deadline_s=selection_deadline_s,
                reporting_deadline_s=reporting_deadline_s,
                max_concurrent_rounds=max_concurrent_rounds,
                epochs=epochs,
                batch_size=batch_size,
                keep_order=keep_order,
                server_optimizer=server_plan.name,
                server_learning_rate=server_plan.learning_rate,
                server_momentum=server_plan.momentum,
                server_beta_1=server_plan.beta_1,
                server_beta_2=server_plan.beta_2,
                server_epsilon=server_plan.epsilon,
                server_initial_preconditioner=server_plan.initial_preconditioner,
                min_examples=rules.min_examples,
                min_separation_s=rules.min_separation_s,
                min_runtime_version=rules.min_runtime_version,
                max_examples_per_device=rules.max_examples_per_device,
                aggregator=expression,
            ).validate()
        except CoordinatorError as exc:
            raise ValueError(str(exc)) from None
        with tempfile.TemporaryDirectory(prefix="overnight-export-") as folder:
            path = pathlib.Path(folder) / f"{task_id}.tflite"
            export_model(
                built,
                path,
                loss=loss_key,
                optimizer=client_plan.name,
                learning_rate=client_plan.learning_rate,
                batch_size=batch_size,
                optimizer_options=dict(client_plan.options),
            )
            model_tflite = path.read_bytes()
        request = admin_pb2.RegisterTaskRequest(
            protocol_version=protocol.PROTOCOL_VERSION,
            config=config.to_proto(),
            model_tflite=model_tflite,
        )
        response: admin_pb2.RegisterTaskResponse = self._admin.call("RegisterTask", request)
        log.info("registered task %s: %d parameters", response.task_id, response.num_parameters)
        return Task(self._admin, task_id, model_tflite, _builder(model))


def _builder(model: Any) -> Any:
    """A function that makes a fresh Keras model of the task's architecture."""
    import tensorflow as tf

    if isinstance(model, tf.keras.Model):
        return lambda: tf.keras.models.clone_model(model)
    return model

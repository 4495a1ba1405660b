"""A registered task, from Python: its rounds as they commit, its model, its control."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

from device_runtime import constants as protocol
from overnight.admin_calls import AdminConnection, AdminError
from overnight.round_result import RoundResult
from protos import admin_pb2

if TYPE_CHECKING:  # TensorFlow only where a Keras model is asked for
    import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """Metrics of a model on examples, computed locally with LiteRT."""

    loss: float
    accuracy: float
    num_examples: int


class Task:
    """A federated training task on a coordinator (see `overnight.Client.create_task`).

    Methods that talk to the coordinator raise `overnight.AdminError` with the status code
    protos/admin.proto documents for that call.
    """

    def __init__(
        self,
        connection: AdminConnection,
        task_id: str,
        model_tflite: bytes | None = None,
        build_keras_model: Callable[[], tf.keras.Model] | None = None,
    ) -> None:
        self._admin = connection
        self.task_id = task_id
        self._model_tflite = model_tflite
        self._build_keras_model = build_keras_model

    @property
    def model_tflite(self) -> bytes | None:
        """The exported training model the devices run (when this handle has it)."""
        return self._model_tflite

    def __repr__(self) -> str:
        return f"Task({self.task_id!r})"

    def status(self) -> admin_pb2.TaskStatus:
        """The task's config, state (running, paused, cancelled, completed, failed: ...),
        committed rounds and current round."""
        request = admin_pb2.GetTaskStatusRequest(
            protocol_version=protocol.PROTOCOL_VERSION, task_id=self.task_id
        )
        return self._admin.call("GetTaskStatus", request)

    def history(self) -> list[RoundResult]:
        """Every closed round so far, oldest first."""
        request = admin_pb2.ListRoundsRequest(
            protocol_version=protocol.PROTOCOL_VERSION, task_id=self.task_id
        )
        response: admin_pb2.ListRoundsResponse = self._admin.call("ListRounds", request)
        return [RoundResult.from_summary(r) for r in response.rounds]

    def rounds(self, after_round: int = 0, progress: bool = True) -> Iterator[RoundResult]:
        """Yields each closed round as the coordinator records it, like the loop over
        `process.next(state, data)` in a TFF simulation:

            for result in task.rounds():
                print(f"round {result.round_number:2d}, metrics={result.tff_metrics}")

        Starts with the rounds already closed (after `after_round`), then waits on the
        coordinator's WatchRounds stream: nothing polls. Ends when the task completes, is
        cancelled or fails. Failed rounds are yielded too (`result.state == "failed"`).

        Args:
          after_round: skip rounds numbered up to this one (to resume a broken loop).
          progress: show a tqdm progress bar of committed rounds (in a notebook, a widget).

        Raises:
          AdminError: NOT_FOUND for an unknown task; UNAVAILABLE when the coordinator stops
            (call again with `after_round` set to the last round received).
        """
        total = self.status().config.total_rounds
        bar = _progress_bar(total, self.task_id) if progress else None
        request = admin_pb2.WatchRoundsRequest(
            protocol_version=protocol.PROTOCOL_VERSION,
            task_id=self.task_id,
            after_round=after_round,
        )
        stream = self._admin.stub.WatchRounds(request, metadata=self._admin.metadata)
        try:
            for summary in stream:
                result = RoundResult.from_summary(summary)
                if bar is not None and result.committed:
                    bar.update(1)
                    loss = result.metrics.get("client_work/train/loss")
                    if loss is not None:
                        bar.set_postfix(loss=f"{loss:.4f}")
                yield result
        except grpc.RpcError as exc:
            raise AdminError("WatchRounds", exc.code(), exc.details() or "") from None
        finally:
            stream.cancel()
            if bar is not None:
                bar.close()

    def weights(self) -> np.ndarray:
        """The latest committed weights (the initial ones before any commit): one float32
        vector in the layout of the model's manifest."""
        request = admin_pb2.DownloadWeightsRequest(
            protocol_version=protocol.PROTOCOL_VERSION, task_id=self.task_id
        )
        received = bytearray()
        sha256 = ""
        try:
            for chunk in self._admin.stub.DownloadWeights(request, metadata=self._admin.metadata):
                if chunk.offset != len(received):
                    raise AdminError("DownloadWeights", grpc.StatusCode.DATA_LOSS, "chunk gap")
                received += chunk.data
                sha256 = chunk.sha256
        except grpc.RpcError as exc:
            raise AdminError("DownloadWeights", exc.code(), exc.details() or "") from None
        if hashlib.sha256(received).hexdigest() != sha256:
            raise AdminError("DownloadWeights", grpc.StatusCode.DATA_LOSS, "checksum mismatch")
        return np.frombuffer(bytes(received), "<f4").astype(np.float32)

    def keras_model(self) -> tf.keras.Model:
        """A fresh Keras model (from the task's model or model_fn) holding the latest
        committed weights, ready for `predict`, `evaluate` or `save`."""
        if self._build_keras_model is None:
            raise ValueError(
                f"task {self.task_id!r} was opened without its model; pass model= to "
                "client.task(...)"
            )
        model = self._build_keras_model()
        flat = self.weights()
        offset = 0
        values = []
        for variable in model.trainable_weights:
            size = int(np.prod(variable.shape))
            values.append(flat[offset : offset + size].reshape(variable.shape))
            offset += size
        if offset != flat.size:
            raise ValueError(
                f"the model has {offset} trainable parameters, the task {flat.size}: not the "
                "model this task was created with"
            )
        for variable, value in zip(model.trainable_weights, values, strict=True):
            variable.assign(value)
        return model

    def evaluate(self, x: Any, y: Any) -> Evaluation:
        """Evaluates the latest committed weights on (x, y) locally with LiteRT: the model
        the devices run, not a TensorFlow re-creation of it."""
        if self._model_tflite is None:
            raise ValueError(f"task {self.task_id!r} was opened without its exported model")
        from device_runtime.model_runner import TrainableModel

        model = TrainableModel(self._model_tflite)
        model.set_weights(self.weights())
        result = model.evaluate(np.asarray(x), np.asarray(y))
        return Evaluation(float(result.loss), float(result.accuracy), int(len(x)))

    def pause(self) -> str:
        """Stops assigning devices; open rounds run on to their deadlines. Returns the state."""
        return self._control("PauseTask", admin_pb2.PauseTaskRequest)

    def resume(self) -> str:
        """Lets a paused task assign devices again. Returns the state."""
        return self._control("ResumeTask", admin_pb2.ResumeTaskRequest)

    def cancel(self) -> str:
        """Ends the task for good; its open rounds are abandoned. Returns the state."""
        return self._control("CancelTask", admin_pb2.CancelTaskRequest)

    def _control(self, method: str, message: Any) -> str:
        request = message(protocol_version=protocol.PROTOCOL_VERSION, task_id=self.task_id)
        status: admin_pb2.TaskStatus = self._admin.call(method, request)
        return status.state


def _progress_bar(total: int, task_id: str) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # the bar is a courtesy; tqdm comes with the export extra
        return None
    return tqdm(total=total, desc=f"task {task_id}", unit="round")

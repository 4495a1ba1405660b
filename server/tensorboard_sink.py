"""Round metrics as TensorBoard scalars, one run directory per task (no TensorFlow needed).

Uses TensorBoard's own event-file writer; `tensorboard --logdir DATA_DIR/tensorboard` shows
every task's `client_work/train/*`, `aggregator/*`, `eval/*` and bit counts per round.
"""

from __future__ import annotations

import pathlib
import time

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from server.store import RoundRecord, RoundState
from server.task_runtime import TaskRuntime


class TensorBoardSink:
    """A coordinator round observer. Failed and abandoned rounds are not plotted."""

    def __init__(self, log_dir: str | pathlib.Path) -> None:
        self._log_dir = pathlib.Path(log_dir)
        self._writers: dict[str, EventFileWriter] = {}

    def __call__(self, task: TaskRuntime, record: RoundRecord) -> None:
        if record.state is not RoundState.COMMITTED:
            return
        writer = self._writers.get(record.task_id)
        if writer is None:
            directory = self._log_dir / record.task_id
            directory.mkdir(parents=True, exist_ok=True)
            writer = self._writers[record.task_id] = EventFileWriter(str(directory))
        summary = summary_pb2.Summary(
            value=[
                summary_pb2.Summary.Value(tag=tag, simple_value=float(value))
                for tag, value in sorted(record.metrics.items())
            ]
        )
        writer.add_event(
            event_pb2.Event(wall_time=time.time(), step=task.committed_rounds, summary=summary)
        )
        writer.flush()

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()

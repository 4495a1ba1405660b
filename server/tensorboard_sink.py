"""Round metrics as TensorBoard scalars, one run directory per task (no TensorFlow needed).

Uses TensorBoard's own event-file writer; `tensorboard --logdir DATA_DIR/tensorboard` shows
every task's `client_work/train/*`, `aggregator/*`, `eval/*` and bit counts per round.
"""

from __future__ import annotations

import pathlib
import sys
import time
import types

# TensorBoard's writer imports TensorFlow, when it is installed, the first time it writes a
# file, unless its `notf` marker module exists; then it uses its own TensorFlow-free stub.
# The coordinator must never load TensorFlow (it also cost 13 s at the first commit).
sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))

from tensorboard.compat.proto import event_pb2, summary_pb2  # noqa: E402
from tensorboard.summary.writer.event_file_writer import EventFileWriter  # noqa: E402

from server.private_files import prepare_data_dir, private_umask  # noqa: E402
from server.store import RoundRecord, RoundState  # noqa: E402
from server.task_runtime import TaskRuntime  # noqa: E402


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
            prepare_data_dir(self._log_dir)  # 0700, like the data directory it lives in
            directory = prepare_data_dir(self._log_dir / record.task_id)
            # The writer opens its event file itself, later: it gets 0600 from the umask.
            with private_umask():
                writer = EventFileWriter(str(directory))
                self._writers[record.task_id] = writer
                self._write(writer, task, record)
            return
        self._write(writer, task, record)

    def _write(self, writer: EventFileWriter, task: TaskRuntime, record: RoundRecord) -> None:
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

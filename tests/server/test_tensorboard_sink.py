import pathlib

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from server.store import RoundRecord, RoundState
from server.tensorboard_sink import TensorBoardSink


class _Task:
    committed_rounds = 3


def test_committed_round_metrics_become_scalars(tmp_path: pathlib.Path) -> None:
    sink = TensorBoardSink(tmp_path)
    record = RoundRecord(
        "t1",
        3,
        RoundState.COMMITTED,
        5,
        4,
        1,
        {"eval/accuracy": 0.75, "client_work/train/loss": 0.5},
        0.0,
        1.0,
    )
    failed = RoundRecord("t1", 4, RoundState.FAILED, 5, 0, 5, {"eval/accuracy": 0.0}, 0.0, 1.0)

    sink(_Task(), record)  # type: ignore[arg-type]
    sink(_Task(), failed)  # type: ignore[arg-type]
    sink.close()

    events = EventAccumulator(str(tmp_path / "t1"))
    events.Reload()
    [accuracy] = events.Scalars("eval/accuracy")
    assert (accuracy.step, accuracy.value) == (3, 0.75)
    assert events.Scalars("client_work/train/loss")[0].value == 0.5

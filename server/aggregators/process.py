"""A task's aggregation across rounds: its configuration, its state, and each round's aggregator.

State is a flat dict of floats (adaptive estimates, DP rounds spent). Each round's finalize
returns it among the round's metrics under `aggregator_state/...`, so it is committed atomically
with the round (the coordinator's round commit), and `AggregationProcess.restore` reads it back
from the last committed round after a restart.
"""

from __future__ import annotations

import numpy as np

from device_runtime.model_file import read_manifest
from server.aggregation import Float32WeightedMean, UpdateAggregator
from server.aggregators.config import AggregatorConfig
from server.aggregators.presets import parse_aggregator
from server.aggregators.round_aggregator import EncodedRoundAggregator, State
from server.errors import InvalidArgument

STATE_PREFIX = "aggregator_state/"


def tensor_sizes_of(model_bytes: bytes) -> tuple[int, ...]:
    """The sizes of the model's trainable tensors, in weight-layout order (from its manifest)."""
    return tuple(w.size for w in read_manifest(model_bytes).weights)


def check_aggregator_expression(expression: str) -> AggregatorConfig:
    """Raises InvalidArgument naming what is wrong with a task's aggregator expression."""
    try:
        return parse_aggregator(expression)
    except ValueError as exc:
        raise InvalidArgument(f"task config field 'aggregator': {exc}") from exc


class AggregationProcess:
    def __init__(
        self,
        config: AggregatorConfig,
        tensor_sizes: tuple[int, ...],
        rng: np.random.Generator | None = None,
    ) -> None:
        self.config = config.validate()
        self.tensor_sizes = tensor_sizes
        self.num_parameters = sum(tensor_sizes)
        # Seeds rotations and DP noise: unpredictable unless a test injects a generator.
        self._rng = rng if rng is not None else np.random.default_rng()
        self.state: State = self.initial_state()

    @classmethod
    def for_task(
        cls,
        expression: str,
        model_bytes: bytes,
        committed_metrics: dict[str, float] | None = None,
        rng: np.random.Generator | None = None,
    ) -> AggregationProcess:
        process = cls(check_aggregator_expression(expression), tensor_sizes_of(model_bytes), rng)
        process.restore(committed_metrics or {})
        return process

    def initial_state(self) -> State:
        c, state = self.config, {}
        if c.zeroing is not None and c.zeroing.adaptive is not None:
            state["zeroing_estimate"] = c.zeroing.adaptive.initial_estimate
        if c.clipping is not None and c.clipping.adaptive is not None:
            state["clipping_estimate"] = c.clipping.adaptive.initial_estimate
        if c.dp is not None:
            state["dp_rounds"] = 0.0
            if c.dp.fixed_clip is None:
                state["dp_clip"] = c.dp.initial_l2_norm_clip
        return state

    def restore(self, committed_metrics: dict[str, float]) -> None:
        """Takes the state committed with a round (its `aggregator_state/...` metrics)."""
        for key in self.state:
            if STATE_PREFIX + key in committed_metrics:
                self.state[key] = float(committed_metrics[STATE_PREFIX + key])

    def _adopt(self, state: State) -> None:
        self.state = dict(state)

    def start_round(self) -> UpdateAggregator:
        """The aggregator of a new round, with a fresh shared seed."""
        if self.config.plain_mean:
            return Float32WeightedMean(self.num_parameters)
        if self.config.secure is not None:
            from server.secagg.round_aggregator import SecureSumRoundAggregator

            return SecureSumRoundAggregator(
                self.config.secure, self.num_parameters, self.config.weighted
            )
        seed = int(self._rng.integers(0, 2**64, dtype=np.uint64))
        return self.round_with(seed, self.state)

    def round_with(self, seed: int, state: State, adopt: bool = True) -> UpdateAggregator:
        """A round's aggregator with a given shared seed and state: on replicas, every one
        builds the same round the leader opened (server/replica_coordinator.py). `adopt`:
        its finalize becomes this process's state (the leader's merge target only)."""
        if self.config.plain_mean:
            return Float32WeightedMean(self.num_parameters)
        if self.config.secure is not None:
            raise ValueError("secure rounds are not rebuilt from a seed")
        return EncodedRoundAggregator(
            self.config,
            self.tensor_sizes,
            seed,
            state,
            self._rng,
            self._adopt if adopt else None,
        )

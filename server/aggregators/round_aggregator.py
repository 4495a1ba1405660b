"""The server half of a composed aggregator for one round: accumulate, merge, finalize.

Stages, outermost first, as in TFF: zeroing, clipping or DP, mean, codec. The client halves ran
on the devices (device_runtime/aggregation/client.py), but a device may not have run them: here
each encoded update is checked, its decoded norm measured and the zeroing and clipping applied
again by the server (enforcement.py), then it is added straight into a `CodecAccumulator`
(memory O(model)), scaled by what the server's stages decided. At
finalize the stages turn the sum into the mean (plus DP noise), report their measurements under
their own names, and compute the state of the next round (adaptive bounds, privacy spent).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from device_runtime import constants as protocol
from device_runtime.aggregation.client import ClientAggregationSpec, NormBound
from device_runtime.aggregation.codec import UpdateCodec, UpdateFlags
from device_runtime.aggregation.codec_spec import CodecError
from protos import device_pb2
from server.aggregators import privacy, quantile
from server.aggregators.config import AggregatorConfig, NormStageConfig, QuantileEstimatorConfig
from server.aggregators.enforcement import NormEnforcer
from server.errors import InvalidArgument

State = dict[str, float]


def norm_bound(stage: NormStageConfig, estimate: float) -> NormBound:
    if stage.fixed_norm is not None:
        return NormBound(stage.fixed_norm, stage.norm_order)
    assert stage.adaptive is not None
    return NormBound(quantile.bound(stage.adaptive, estimate), stage.norm_order, estimate)


class EncodedRoundAggregator:
    """Implements server.aggregation.UpdateAggregator for encoding "overnight_encoded_v1"."""

    encoding = protocol.UPDATE_ENCODING_V1

    def __init__(
        self,
        config: AggregatorConfig,
        tensor_sizes: tuple[int, ...],
        seed: int,
        state: State,
        rng: np.random.Generator,
        on_finalize: Callable[[State], None] | None = None,
    ) -> None:
        self.config = config
        self.state = dict(state)
        self._rng = rng
        self._on_finalize = on_finalize
        zeroing = clipping = None
        if config.zeroing is not None:
            zeroing = norm_bound(config.zeroing, state.get("zeroing_estimate", 0.0))
        if config.clipping is not None:
            clipping = norm_bound(config.clipping, state.get("clipping_estimate", 0.0))
        elif config.dp is not None:
            clip = config.dp.fixed_clip
            estimate = 0.0 if clip is not None else state["dp_clip"]
            clipping = NormBound(clip if clip is not None else state["dp_clip"], 2.0, estimate)
        self.client = ClientAggregationSpec(config.codec, seed, tensor_sizes, zeroing, clipping)
        self.codec = UpdateCodec(config.codec, tensor_sizes, seed)
        self._enforcer = NormEnforcer(
            self.codec, zeroing, clipping, clipping_is_sensitivity=config.dp is not None
        )
        self._enforced = {UpdateFlags.ZEROED: 0, UpdateFlags.CLIPPED: 0}
        self._sum = self.codec.new_accumulator()
        self.count = 0
        self.total_weight = 0.0
        self._nonfinite = 0
        self._flag_counts = {flag: 0 for flag in UpdateFlags}

    def client_spec(self) -> device_pb2.AggregationSpec:
        return self.client.to_proto()

    def expected_payload_bytes(self, header: device_pb2.UploadHeader) -> int:
        if header.encoding != self.encoding:
            raise InvalidArgument(
                f"update encoding {header.encoding!r} is not this round's ({self.encoding!r})"
            )
        if header.num_elements != self.codec.num_parameters:
            raise InvalidArgument(
                f"update has {header.num_elements} elements, the model has "
                f"{self.codec.num_parameters}"
            )
        if header.example_count <= 0:
            raise InvalidArgument(f"example_count must be positive, got {header.example_count}")
        return self.codec.payload_bytes

    def accumulate(self, header: device_pb2.UploadHeader, payload: bytes) -> None:
        self.expected_payload_bytes(header)
        try:
            update = self.codec.parse(payload)
        except CodecError as exc:
            raise InvalidArgument(f"encoded update refused: {exc}") from exc
        self._check_flags(update.flags)
        # Everything below is infallible: a refused update changed nothing above.
        self.count += 1
        weight = float(header.example_count) if self.config.weighted else 1.0
        if update.finite:
            # The server's own zeroing and clipping, whatever the device's flags claim.
            verdict = self._enforcer.judge(update)
        else:
            # As TFF's FedAvg: a zero update with weight 0. An unweighted mean ignores weights,
            # so there it still counts as one client, as in TFF's unweighted FedAvg.
            verdict = self._enforcer.judge_non_finite()
            weight = 0.0 if self.config.weighted else weight
            self._nonfinite += 1
        if verdict.scale > 0:
            self._sum.add(update, weight * verdict.scale)
        self.total_weight += weight
        for flag in UpdateFlags:
            self._flag_counts[flag] += bool(verdict.flags & flag)
        for flag in self._enforced:
            self._enforced[flag] += bool(verdict.enforced & flag)

    def _check_flags(self, flags: UpdateFlags) -> None:
        allowed = UpdateFlags(0)
        if self.client.zeroing is not None:
            allowed |= UpdateFlags.ZEROED
            if self.client.zeroing.estimate > 0:
                allowed |= UpdateFlags.BELOW_ZEROING_ESTIMATE
        if self.client.clipping is not None:
            allowed |= UpdateFlags.CLIPPED
            if self.client.clipping.estimate > 0:
                allowed |= UpdateFlags.BELOW_CLIPPING_ESTIMATE
        if flags & ~allowed:
            raise InvalidArgument(
                f"encoded update carries flags {flags!r} that this round's aggregator never sets"
            )

    def merge(self, other: EncodedRoundAggregator) -> None:
        """Adds another shard's partial aggregate of the same round into this one."""
        if other.codec.seed != self.codec.seed or other.config != self.config:
            raise ValueError("only partial aggregates of the same round merge")
        self._sum.merge(other._sum)
        self.count += other.count
        self.total_weight += other.total_weight
        self._nonfinite += other._nonfinite
        for flag in UpdateFlags:
            self._flag_counts[flag] += other._flag_counts[flag]
        for flag in self._enforced:
            self._enforced[flag] += other._enforced[flag]

    def finalize(self) -> tuple[np.ndarray, dict[str, float]]:
        config, state, client = self.config, dict(self.state), self.client
        total = self._sum.weighted_sum()
        metrics: dict[str, float] = {
            "aggregator/num_reports": float(self.count),
            "aggregator/total_weight": self.total_weight,
            "aggregator/num_nonfinite_updates": float(self._nonfinite),
            "aggregator/codec/payload_bits_per_parameter": (
                8.0 * self.codec.payload_bytes / self.codec.num_parameters
            ),
        }
        # Every report votes, non-finite ones included (as zeros), as in TFF.
        counts, voters = self._flag_counts, self.count
        if config.zeroing is not None and client.zeroing is not None:
            metrics["aggregator/zeroing/zeroing_norm"] = client.zeroing.bound
            metrics["aggregator/zeroing/zeroed_count"] = float(counts[UpdateFlags.ZEROED])
            metrics["aggregator/zeroing/enforced_count"] = float(self._enforced[UpdateFlags.ZEROED])
            if config.zeroing.adaptive is not None:
                state["zeroing_estimate"] = quantile.next_estimate(
                    config.zeroing.adaptive,
                    state["zeroing_estimate"],
                    counts[UpdateFlags.BELOW_ZEROING_ESTIMATE],
                    voters,
                )
        if config.clipping is not None and client.clipping is not None:
            metrics["aggregator/clipping/clipping_norm"] = client.clipping.bound
            metrics["aggregator/clipping/clipped_count"] = float(counts[UpdateFlags.CLIPPED])
            metrics["aggregator/clipping/enforced_count"] = float(
                self._enforced[UpdateFlags.CLIPPED]
            )
            if config.clipping.adaptive is not None:
                state["clipping_estimate"] = quantile.next_estimate(
                    config.clipping.adaptive,
                    state["clipping_estimate"],
                    counts[UpdateFlags.BELOW_CLIPPING_ESTIMATE],
                    voters,
                )
        if config.dp is not None:
            mean = self._private_mean(total, state, metrics)
        else:
            mean = total / self.total_weight if self.total_weight > 0 else np.zeros_like(total)
            metrics["aggregator/mean/mean_weight"] = self.total_weight
        metrics.update({f"aggregator_state/{k}": v for k, v in state.items()})
        if self._on_finalize is not None:
            self._on_finalize(state)
        return mean.astype(np.float32), metrics

    def _private_mean(
        self, total: np.ndarray, state: State, metrics: dict[str, float]
    ) -> np.ndarray:
        dp = self.config.dp
        assert dp is not None and self.client.clipping is not None
        clip = self.client.clipping.bound
        stddev = privacy.sum_noise_multiplier(dp) * clip
        noised = total.astype(np.float64)
        if stddev > 0:
            noised += self._rng.normal(0.0, stddev, total.shape)
        if dp.fixed_clip is None:
            # The clipped-count query of adaptive clipping, noised with its own stddev.
            estimator = QuantileEstimatorConfig(
                dp.initial_l2_norm_clip, dp.target_unclipped_quantile, dp.learning_rate
            )
            state["dp_clip"] = quantile.next_estimate(
                estimator,
                state["dp_clip"],
                self._flag_counts[UpdateFlags.BELOW_CLIPPING_ESTIMATE],
                self.count,
                noise_stddev=dp.count_stddev,
                denominator=dp.clients_per_round,
                rng=self._rng,
            )
        state["dp_rounds"] = state.get("dp_rounds", 0.0) + 1
        # TFF's `dp_query_metrics/clip` is the clip after this round's update, the one the
        # next round uses; both are reported, each under a name that says which it is.
        metrics["aggregator/dp/clip_applied"] = clip
        metrics["aggregator/dp/next_clip"] = state.get("dp_clip", clip)
        metrics["aggregator/dp/noise_stddev"] = stddev
        metrics["aggregator/dp/clipped_count"] = float(self._flag_counts[UpdateFlags.CLIPPED])
        metrics["aggregator/dp/enforced_count"] = float(self._enforced[UpdateFlags.CLIPPED])
        metrics["aggregator/dp/epsilon"] = privacy.epsilon_spent(dp, int(state["dp_rounds"]))
        metrics["aggregator/dp/delta"] = dp.target_delta
        return noised / dp.clients_per_round

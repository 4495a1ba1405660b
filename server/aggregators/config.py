"""What an aggregator is: the stages of a composition and their parameters (no state)."""

from __future__ import annotations

import dataclasses
import math

from device_runtime.aggregation.codec_spec import FLOAT32, CodecSpec

# No parameter of a stage (a norm, a clip, a weight, a noise multiplier, a rate) may exceed
# this: beyond it, products such as 2 * clip or clip * levels overflow float64.
max_parameter = 1e12


def _check_magnitudes(where: str, stage: object) -> None:
    """Raises ValueError for a number of the stage (or its adaptive estimate) above
    `max_parameter` in magnitude; norm orders (1, 2 or inf) are checked by the stage."""
    for field in dataclasses.fields(stage):  # type: ignore[arg-type]
        value = getattr(stage, field.name)
        if dataclasses.is_dataclass(value):
            _check_magnitudes(where, value)
        elif (
            isinstance(value, float | int)
            and field.name != "norm_order"
            and not abs(value) <= max_parameter
        ):
            raise ValueError(f"{where}: {field.name} must be at most {max_parameter:g}")


@dataclasses.dataclass(frozen=True)
class QuantileEstimatorConfig:
    """An adaptive norm bound (Andrew et al. 2021): estimate <- estimate * exp(-lr * (b - q)),
    b the share of clients whose norm is <= the estimate. The bound used is
    multiplier * estimate + increment (TFF's PrivateQuantileEstimationProcess)."""

    initial_estimate: float
    target_quantile: float
    learning_rate: float
    multiplier: float = 1.0
    increment: float = 0.0

    def validate(self, where: str) -> None:
        if not (math.isfinite(self.initial_estimate) and self.initial_estimate > 0):
            raise ValueError(f"{where}: initial estimate must be positive")
        if not 0 < self.target_quantile < 1:
            raise ValueError(f"{where}: target quantile must be in (0, 1)")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"{where}: learning rate must be positive")
        if not (math.isfinite(self.multiplier) and self.multiplier > 0):
            raise ValueError(f"{where}: multiplier must be a positive number")
        if not (math.isfinite(self.increment) and self.increment >= 0):
            raise ValueError(f"{where}: increment must be a number >= 0")


@dataclasses.dataclass(frozen=True)
class NormStageConfig:
    """Zeroing or clipping: a fixed bound, or an adaptive one."""

    fixed_norm: float | None = None
    adaptive: QuantileEstimatorConfig | None = None
    norm_order: float = 2.0

    def validate(self, where: str) -> None:
        if (self.fixed_norm is None) == (self.adaptive is None):
            raise ValueError(f"{where}: give either a fixed norm or an adaptive estimate")
        if self.fixed_norm is not None and not (
            math.isfinite(self.fixed_norm) and self.fixed_norm > 0
        ):
            raise ValueError(f"{where}: norm must be positive, got {self.fixed_norm}")
        if self.adaptive is not None:
            self.adaptive.validate(where)
        if not (self.norm_order in (1.0, 2.0) or math.isinf(self.norm_order)):
            raise ValueError(f"{where}: norm_order must be 1, 2 or inf")


@dataclasses.dataclass(frozen=True)
class DpConfig:
    """Gaussian DP (TFF's DifferentiallyPrivateFactory.gaussian_fixed / gaussian_adaptive)."""

    noise_multiplier: float
    clients_per_round: float
    fixed_clip: float | None = None  # None: adaptive clip
    initial_l2_norm_clip: float = 0.1
    target_unclipped_quantile: float = 0.5
    learning_rate: float = 0.2
    clipped_count_stddev: float | None = None  # None: TFF's default, see count_stddev
    target_delta: float = 1e-5  # the delta at which epsilon is reported

    @property
    def count_stddev(self) -> float:
        """The stddev of the noise on the clipped count of adaptive clipping.

        TFF's rule (differential_privacy.adaptive_clip_noise_params, v0.87): a given stddev is
        used as given; without one it is 0.05 * clients_per_round when the noise multiplier is
        positive, and 0 when it is 0 (no privacy is claimed, so the clip's trajectory is
        deterministic)."""
        if self.clipped_count_stddev is not None:
            return self.clipped_count_stddev
        return 0.05 * self.clients_per_round if self.noise_multiplier > 0 else 0.0

    def validate(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ValueError("dp: noise_multiplier must be >= 0")
        if not (math.isfinite(self.clients_per_round) and self.clients_per_round > 0):
            raise ValueError("dp: clients_per_round must be a positive number")
        if self.fixed_clip is not None and not (
            math.isfinite(self.fixed_clip) and self.fixed_clip > 0
        ):
            raise ValueError("dp: clip must be a positive number")
        if not (math.isfinite(self.initial_l2_norm_clip) and self.initial_l2_norm_clip > 0):
            raise ValueError("dp: initial_clip must be a positive number")
        if not 0 < self.target_unclipped_quantile < 1:
            raise ValueError("dp: target_quantile must be in (0, 1)")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError("dp: learning_rate must be a positive number")
        if self.clipped_count_stddev is not None and not (
            math.isfinite(self.clipped_count_stddev) and self.clipped_count_stddev >= 0
        ):
            raise ValueError("dp: clipped_count_stddev must be a number >= 0")
        if not 0 < self.target_delta < 1:
            raise ValueError("dp: target_delta must be in (0, 1)")
        if (
            self.fixed_clip is None
            and self.noise_multiplier > 0
            and 2 * self.count_stddev <= self.noise_multiplier
        ):
            # TFF's gaussian_adaptive: the clipped-count noise spends part of the privacy.
            raise ValueError(
                "dp: clipped_count_stddev too small for the noise multiplier "
                f"(needs 2 * stddev > {self.noise_multiplier})"
            )


@dataclasses.dataclass(frozen=True)
class SecureSumConfig:
    """secure_aggregator(): a weighted mean whose numerator and weights are secure-summed.

    Fixed clipping, where TFF's secure_aggregator() adapts it: `clip` bounds the update's L2
    norm and each element (the field quantization needs a known range), `max_weight` caps an
    example count (the weight's range in the field). Layout: device_runtime/secagg/secure_mean.py.
    """

    clip: float = 1.0  # TFF's initial clipping estimate
    max_weight: float = 10_000.0

    def validate(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"secure_aggregator: clip must be positive, got {self.clip}")
        if not (math.isfinite(self.max_weight) and self.max_weight > 0):
            raise ValueError(
                f"secure_aggregator: max_weight must be positive, got {self.max_weight}"
            )


@dataclasses.dataclass(frozen=True)
class AggregatorConfig:
    """zeroing(clipping(mean(codec))), zeroing(dp(codec)) or secure_aggregator(); every stage
    optional."""

    weighted: bool = True
    zeroing: NormStageConfig | None = None
    clipping: NormStageConfig | None = None
    dp: DpConfig | None = None
    codec: CodecSpec = CodecSpec()
    secure: SecureSumConfig | None = None

    @property
    def plain_mean(self) -> bool:
        """Nothing but a weighted mean of raw float32 deltas (the original wire encoding)."""
        return (
            self.weighted
            and self.secure is None
            and self.zeroing is None
            and self.clipping is None
            and self.dp is None
            and self.codec.name == FLOAT32
        )

    def validate(self) -> AggregatorConfig:
        for where, stage in (
            ("zeroing", self.zeroing),
            ("clipping", self.clipping),
            ("dp", self.dp),
            ("secure_aggregator", self.secure),
        ):
            if stage is not None:
                _check_magnitudes(where, stage)
        if self.zeroing is not None:
            self.zeroing.validate("zeroing")
        if self.clipping is not None:
            self.clipping.validate("clipping")
            if self.clipping.norm_order != 2.0:
                raise ValueError("clipping is L2 only")
        if self.dp is not None:
            self.dp.validate()
            if self.clipping is not None:
                raise ValueError("dp clips updates itself; do not compose it with clipping")
            if self.weighted:
                raise ValueError("dp averages unweighted (as TFF's dp_aggregator)")
        self.codec.validate()
        if self.secure is not None:
            self.secure.validate()
            if (self.zeroing, self.clipping, self.dp) != (None, None, None) or (
                self.codec.name != FLOAT32
            ):
                raise ValueError(
                    "secure_aggregator clips with a fixed bound and quantizes itself; it does "
                    "not compose with zeroing, clipping, dp or a codec"
                )
        return self

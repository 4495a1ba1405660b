"""The coordinator's own zeroing and clipping of each decoded update: client flags are claims.

Devices run the client half of the aggregator (device_runtime/aggregation/client.py), but a
device may lie, or run other code. So the server measures the norm of every update it decodes
and applies the same stages itself, TFF's recipe (zeroing outside clipping) with the round's
bounds (fixed, or from the adaptive estimates in the task's state):

- zeroing: an update whose norm (the stage's order) exceeds the zeroing bound adds nothing
  (its weight still counts, as in TFF's zeroing_factory);
- clipping (and DP's clipping): an update whose L2 norm exceeds the clipping bound is scaled
  onto the bound.

Lossy codecs decode an honest, client-clipped update to a slightly larger norm (quantization
noise; DRIVE's sign codec by about sqrt(pi / 2)). Clipping that noise away would bias every
honest update, so the server compares a lossy update's norm with the bound times the codec's
`decoding_allowance`; beyond it, the update cannot be an honest encoding and is clipped to the
bound itself. The exact codec (float32) gets no allowance beyond float rounding, and neither
does DP's clip: it is the sensitivity the noise is calibrated to. So one device's contribution
to the sum is at most weight * bound * allowance in L2 norm, whatever it sends.

Zeroing measures the inf norm (TFF's default). For a rotated codec (one_bit_aggregator(), uniform
with rotation) the exact inf norm needs the rotation undone, ~100 ms for a CNN-sized update,
where everything else costs ~1 ms. The server first tries a free bound (the largest rotation
block's L2 norm); when that cannot settle it and a clipping stage follows, the update is not
zeroed but is clipped like any other, so what zeroing might miss is still bounded by the clip.
Without a clipping stage, zeroing is the only bound and the server pays for the exact norm.

An update with a NaN or an infinity counts as TFF's FedAvg makes it: all zeros (weight 0 in a
weighted mean, one client in an unweighted one), voting "below" every adaptive estimate.

The adaptive estimates take each device's vote (norm <= estimate), which only the device can
know before its clipping. The server accepts a "below" vote only when the decoded norm is
consistent with it; a device can still vote "above" at will, moving the estimate by at most
one vote, the influence TFF's quantile estimation is designed to tolerate.
"""

from __future__ import annotations

import dataclasses
import math

from device_runtime.aggregation import codec_spec
from device_runtime.aggregation.client import NormBound
from device_runtime.aggregation.codec import ParsedUpdate, UpdateCodec, UpdateFlags
from device_runtime.aggregation.codec_spec import CodecSpec
from server.aggregators.decoded_norms import DecodedNormMeter, Squares

# float32 rounding of a client's clip_l2 and of the norm itself: relative, far above both.
rounding_tolerance = 1e-5
# A rotated block's sign-codec estimate has about sqrt(pi / 2) ~ 1.25 times its norm; the
# margin covers small blocks, where it varies more.
sign_codec_inflation = 1.5
# Uniform quantization's noise relative to a segment's range, generously: an honest vector's
# norm grows by at most about 1 + 5 / (2^bits - 1) (8 bits: 2%, 1 bit: 6x).
uniform_codec_noise = 5.0


def decoding_allowance(spec: CodecSpec) -> float:
    """How much larger than its encoded vector an honest update may decode (norm ratio)."""
    match spec.name:
        case codec_spec.FLOAT32 | codec_spec.TOP_K:  # exact values; top_k only drops some
            return 1.0
        case codec_spec.UNIFORM:
            return 1.0 + uniform_codec_noise / ((1 << spec.bits) - 1)
        case codec_spec.SIGN:
            return sign_codec_inflation / math.sqrt(spec.keep_fraction)
        case name:
            raise ValueError(f"unknown codec {name!r}")


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What the server does with one finite decoded update."""

    scale: float  # the update is added times this (0: zeroed)
    flags: UpdateFlags  # what is counted: zeroed, clipped, and the votes the server accepts
    enforced: UpdateFlags  # ZEROED / CLIPPED where the server had to do it, not the device


class DecodedNorms:
    """The norms of one decoded update, each computed at most once, cheapest bound first."""

    def __init__(self, meter: DecodedNormMeter, update: ParsedUpdate) -> None:
        self._meter = meter
        self._update = update
        self._squares: Squares | None = None
        self._norms: dict[float, float] = {}

    @property
    def squares(self) -> Squares:
        if self._squares is None:
            self._squares = self._meter.squares(self._update)
        return self._squares

    def norm(self, order: float) -> float:
        if order not in self._norms:
            if order == 2.0:
                self._norms[order] = math.sqrt(self.squares.total)
            else:
                self._norms[order] = self._meter.norm(self._update, order)
        return self._norms[order]

    def at_most(self, order: float, limit: float, exact: bool) -> bool:
        """Whether the norm is at most `limit`. Without `exact`, a rotated codec's inf or L1
        norm that its cheap bound cannot settle counts as within the limit: undoing the
        rotation costs ~100 ms per CNN-sized update, 100x the rest (see NormEnforcer)."""
        if math.isinf(order) and self._meter.max_abs_bound(self._update, self.squares) <= limit:
            return True
        if not exact and self._meter.needs_decode(order):
            return True
        return self.norm(order) <= limit


class NormEnforcer:
    """Applies a round's zeroing and clipping bounds to each decoded update."""

    def __init__(
        self,
        codec: UpdateCodec,
        zeroing: NormBound | None,
        clipping: NormBound | None,
        clipping_is_sensitivity: bool = False,
    ) -> None:
        self._meter = DecodedNormMeter(codec)
        self._zeroing = zeroing
        self._clipping = clipping
        self._slack = decoding_allowance(codec.spec) * (1.0 + rounding_tolerance)
        # DP: whatever the codec, nothing above the clip may reach the noised sum.
        self._clip_slack = 1.0 + rounding_tolerance if clipping_is_sensitivity else self._slack
        self._exact_clip = clipping_is_sensitivity

    def judge_non_finite(self) -> Verdict:
        """The verdict on an update with a NaN or an infinity, whatever its flags claim.

        TFF's FedAvg client replaces such a delta with zeros (and weight 0), and TFF's
        aggregators then see a vector of norm 0: not zeroed, not clipped, and a "below" vote
        for every adaptive estimate. The server judges it as that zero vector. A device gains
        nothing by it: an honest all-zero update earns the same votes (and, weighted, more
        weight)."""
        flags = UpdateFlags(0)
        if self._zeroing is not None and self._zeroing.estimate > 0:
            flags |= UpdateFlags.BELOW_ZEROING_ESTIMATE
        if self._clipping is not None and self._clipping.estimate > 0:
            flags |= UpdateFlags.BELOW_CLIPPING_ESTIMATE
        return Verdict(0.0, flags, UpdateFlags(0))

    def judge(self, update: ParsedUpdate) -> Verdict:
        """`update` must be finite (see `judge_non_finite` for the others)."""
        norms = DecodedNorms(self._meter, update)
        claimed = update.flags
        flags, enforced = UpdateFlags(0), UpdateFlags(0)
        zeroing, clipping = self._zeroing, self._clipping
        if zeroing is not None:
            votes_below = zeroing.estimate > 0 and claimed & UpdateFlags.BELOW_ZEROING_ESTIMATE
            within = zeroing.estimate * self._slack
            if votes_below and norms.at_most(zeroing.norm_order, within, exact=False):
                flags |= UpdateFlags.BELOW_ZEROING_ESTIMATE
            # With a clipping stage after it, an unzeroed outlier is clipped anyway: a rotated
            # codec's exact inf norm is then not worth its inverse rotation.
            exact = clipping is None
            if not norms.at_most(zeroing.norm_order, zeroing.bound * self._slack, exact):
                flags |= UpdateFlags.ZEROED
                enforced |= UpdateFlags.ZEROED
                if clipping is not None and clipping.estimate > 0:
                    flags |= UpdateFlags.BELOW_CLIPPING_ESTIMATE  # zeros are below any bound
                return Verdict(0.0, flags, enforced)
            if claimed & UpdateFlags.ZEROED and norms.norm(2.0) == 0.0:
                flags |= UpdateFlags.ZEROED
        scale = 1.0
        if clipping is not None:
            norm = norms.norm(2.0)
            votes_below = clipping.estimate > 0 and claimed & UpdateFlags.BELOW_CLIPPING_ESTIMATE
            if votes_below and norm <= clipping.estimate * self._slack:
                flags |= UpdateFlags.BELOW_CLIPPING_ESTIMATE
            if norm > clipping.bound * self._clip_slack:
                scale = clipping.bound / norm
                flags |= UpdateFlags.CLIPPED
                enforced |= UpdateFlags.CLIPPED
            elif self._exact_clip and norm > clipping.bound:
                scale = clipping.bound / norm  # float rounding only; not counted as enforced
            if claimed & UpdateFlags.CLIPPED:
                flags |= UpdateFlags.CLIPPED
        return Verdict(scale, flags, enforced)

"""The server half of `secure_aggregator()`: the weighted mean from a completed session."""

from __future__ import annotations

import numpy as np

from device_runtime.secagg.secure_mean import SecureMeanEncoding
from server.secagg.server import SecAggServer


def finalize_secure_mean(
    session: SecAggServer, encoding: SecureMeanEncoding
) -> tuple[np.ndarray, dict[str, float]]:
    """The aggregate and its measurements. Raises FailedPrecondition if the session did not
    complete (the round then fails, as with too few reports)."""
    total, num_summed = session.result()
    mean, total_weight = encoding.decode(total, num_summed)
    return mean, {
        "aggregator/secure_sum/num_summed": float(num_summed),
        "aggregator/total_weight": total_weight,
        "aggregator/secure_sum/modulus_bits": float(encoding.modulus_bits),
    }

"""Activation calibration: histogram state (init/update/merge/finalize) and amax search methods.

``state = init(...); state = jax.jit(update)(state, x); hist = finalize(state, name)``, then
``compute_amax(hist, method)``; the jittable cores (``entropy_amax`` etc.) work on ``(counts,
edges)`` arrays inside ``jit``. See :mod:`cfws_jax.calib.state` and :mod:`cfws_jax.calib.methods`.
"""

from cfws_jax.calib.methods import (
    METHODS,
    NAN_POLICIES,
    compute_amax,
    cosine_amax,
    cosine_scores,
    entropy_amax,
    kl_cfws_amax,
    kl_divergences,
    max_from_counts,
    mse_amax,
    mse_errors,
    num_target_bins,
    percentile_amax,
)
from cfws_jax.calib.state import (
    HistState,
    bin_index,
    Histogram,
    U64,
    finalize,
    init,
    max_abs,
    merge,
    running_amax,
    to_arrays,
    update,
)

__all__ = [
    "METHODS", "NAN_POLICIES", "HistState", "bin_index", "Histogram", "U64", "compute_amax", "cosine_amax", "cosine_scores",
    "entropy_amax", "finalize", "init", "kl_cfws_amax", "kl_divergences", "max_abs",
    "max_from_counts", "merge", "mse_amax", "mse_errors", "num_target_bins", "percentile_amax",
    "running_amax", "to_arrays", "update",
]

"""The one exception type for bad input data (``cfws_jax.data.DataError``)."""

from __future__ import annotations


class DataError(ValueError):
    """Unusable input data: an undecodable or oversized image, a malformed ``.npz``, a data
    file that declares more memory than it holds. The message names the file (and key)."""

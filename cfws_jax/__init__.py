"""cfws_jax: INT8 post-training quantization for re-parameterized CNNs.

Coarse & Fine Weight Splitting (CFWS, arXiv 2312.10588) plus histogram-based
activation calibration, as pure, jittable JAX functions and Flax models.
"""

__version__ = "0.1.0"

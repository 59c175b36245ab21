"""Post-training quantization: configs and presets, calibration, ``QuantizedModel``.

``qm = quantize("repvgg_a0", variables, calibration_batches, get_preset("cfws_kl"))``, then
``quantized_apply_fn(qm)(images) -> logits``; ``save_quantized`` / ``load_quantized`` for orbax.
Presets ``cfws_kl_bc`` / ``cfws_kl_recon`` / ``kl_recon`` add bias correction / learned rounding
after calibration (:mod:`cfws_jax.ptq.reconstruct`; statistics in ``qm.meta["reconstruction"]``);
``cfws_kl_cle`` / ``QuantConfig(cle=True)`` equalizes the fused weights across layers first
(:mod:`cfws_jax.ptq.equalize`; ``qm.meta["cle"]``). ``cfws_kl_u`` / ``cfws_kl_recon_u`` /
``QuantConfig(act_unsigned=True)`` code ReLU outputs unsigned (``0 .. 2^b-1``), for below 8 bits.
"""

from cfws_jax.ptq.config import PRESETS, QuantConfig, get_preset
from cfws_jax.ptq.model import (
    QuantizedModel,
    load_quantized,
    quantize,
    quantized_apply_fn,
    save_quantized,
)

__all__ = [
    "PRESETS", "QuantConfig", "QuantizedModel", "get_preset", "load_quantized", "quantize",
    "quantized_apply_fn", "save_quantized",
]

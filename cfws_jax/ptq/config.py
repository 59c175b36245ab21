"""PTQ configuration: one frozen dataclass and the named presets of the reference code.

Presets (ALGORITHM.md §5):

=================  ==========================  ======================  ===========
preset             weights of rep convs        activation method       ReLU fusion
=================  ==========================  ======================  ===========
``minmax``         plain per-channel           max (all layers)        off
``kl``             plain per-channel           entropy (TensorRT KL)   off
``cfws_minmax``    CFWS                        max                     on
``cfws_kl``        CFWS                        kl_cfws (paper's KL)    on   (main method)
``only_rep_kl``    CFWS                        kl_cfws on rep outputs, max elsewhere   on
``int16_weights``  plain 16-bit on rep convs   kl_cfws                 on
``cfws_no_center`` CFWS, whole-kernel split    kl_cfws                 on
``cfws_tensor_coarse`` CFWS, per-tensor coarse kl_cfws                 on
``cfws_kl_bc``     CFWS + bias correction      kl_cfws                 on
``cfws_kl_recon``  CFWS + learned rounding     kl_cfws                 on   (256 calib images)
``cfws_kl_ort``    CFWS on dense convs,        kl_cfws, unsigned ReLU  on   (``--target onnxruntime``; parallel)
                   branches requantized
``cfws_minmax_ort`` as ``cfws_kl_ort``         max, unsigned ReLU      on
``kl_ort``         plain per-channel           kl_cfws, unsigned ReLU  on   (``--target onnxruntime``, no split: fastest)
``kl_recon``       plain + learned rounding    kl_cfws                 on   (256 calib images)
``cfws_kl_cle``    CLE, then CFWS              kl_cfws                 on
``cfws_kl_u``      CFWS                        kl_cfws, unsigned ReLU  on   (below 8 bits; uint8 runtimes)
``cfws_kl_recon_u`` CFWS + learned rounding    kl_cfws, unsigned ReLU  on   (256 calib images; below 8 bits)
=================  ==========================  ======================  ===========

``cfws_kl_bc``, ``cfws_kl_recon`` and ``kl_recon`` go beyond the paper (issue #14,
:mod:`cfws_jax.ptq.reconstruct`): after calibration, layer by layer in execution order,
``bias_correction`` removes the mean output shift per channel and ``reconstruct`` learns each
weight's rounding (AdaRound) so that the layer's output on quantized inputs matches the float one. ``kl_recon`` is ``cfws_kl_recon``
without the CFWS split (plain per-channel weights), to show what CFWS brings.

``cfws_kl_cle`` (issue #24) first equalizes the fused float weights across layers
(:mod:`cfws_jax.ptq.equalize`: Nagel et al. 2019 cross-layer equalization, the same float
network), so the CFWS split and the calibration see the equalized layers; ``cle=True`` (CLI
``--cle``) does the same for any preset.

``cfws_kl_u`` / ``cfws_kl_recon_u`` (issue #24) give ReLU-fused activations unsigned codes
(``act_unsigned``: ``0 .. 2^b-1`` instead of ``0 .. 2^(b-1)-1``), one more bit of resolution where
the values cannot be negative. TensorRT's int8 is signed, so the paper's presets keep signed codes;
below 8 bits the lost bit is what separates them (CIFAR RepVGG-A0 W4A4: 83.5 % -> 87.8 % without
learned rounding, README). ``--act-unsigned`` does the same for any preset.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from typing import Literal

from cfws_jax.calib import METHODS
from cfws_jax.ptq.recon_checks import check_recon
from cfws_jax.quant import ROUNDINGS

CalibOrder = Literal["sequential", "parallel"]
BIAS_MODES = ("float", "int16")
RECON_UNITS = ("block", "layer")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Everything that decides how a model is quantized.

    Attributes:
      w_bits / a_bits: weight and activation bit-widths (2..16).
      per_channel: per-output-channel weight scales (else per-tensor).
      rounding: ``"half_even"`` or ``"half_up"`` for weights and activations.
      cfws: split the re-parameterized k x k convs (``rep`` layers, odd k > 1) coarse & fine.
      cfws_extract_center / cfws_coarse: the CFWS ablations (``False`` = whole-kernel split;
        ``"tensor"`` = one coarse scale).
      cfws_grouped: split grouped (depthwise) rep convs too; off: they get plain per-channel
        weights (the ``*_ort`` presets: with ``cfws_branch_quant`` a depthwise layer's two
        per-tensor branch points cost more than the split wins, see the README).
      rep_w_bits: weight bits of rep convs when ``cfws`` is off (16 = the INT16 baseline);
        None = ``w_bits``.
      act_method: amax method of the outputs of rep convs (see ``cfws_jax.calib.METHODS``).
      other_act_method: amax method of every other quantized activation; None = ``act_method``.
      input_method: amax method of the network input.
      percentile: for the ``percentile`` method.
      num_bins: histogram bins.
      relu_fusion: calibrate and quantize a conv+ReLU's output after the ReLU (positive range);
        off = quantize ``conv(x)+b`` on ``|y|`` statistics, then apply the ReLU.
      act_unsigned: with ReLU fusion, use unsigned codes (0..2^b-1) instead of 0..2^(b-1)-1.
      act_full_range: signed activation points use the full code range ``-2^(b-1) .. 2^(b-1)-1``
        (scale still ``amax / (2^(b-1)-1)``), as ONNX QuantizeLinear does; off: ``-(2^(b-1)-1) ..``.
      int_bias: add every quantized layer's bias rounded to its accumulator grid ``s_x * s_w[o]``
        (CFWS: the fine scale), as an int32 bias of an integer conv (onnxruntime QLinearConv) is;
        off: the float bias.
      cfws_branch_quant: quantize a CFWS layer's two conv outputs (coarse centre, fine k x k + bias;
        per tensor, signed, ``max`` range) before their sum, as a runtime that requantizes every
        integer conv does (onnxruntime ``QLinearConv`` + ``QLinearAdd``: ``cfws-jax export --target
        onnxruntime``). Off (default): the sum of the two accumulators is quantized once.
      calib_order: ``"sequential"`` (each layer calibrated on quantized upstream activations and
        quantized weights) or ``"parallel"`` (all from the float network).
      quantize_input: quantize the network input (per-tensor).
      quantize_first_layer / quantize_last_layer: weights of the first / last layer (the last
        layer's output, the logits, always stays float); for detectors "last" means every
        output layer (``is_output`` head prediction convs, whose outputs always stay float).
      float_layers: glob patterns of layer names kept entirely in float.
      bias: ``"float"`` or ``"int16"`` (per-tensor, ``max|b| / 32767``).
      num_calib_images / calib_batch_size / seed: calibration sample (``seed`` also seeds the
        reconstruction's minibatches).
      bias_correction: after calibration, subtract from every quantized layer's bias the mean
        (over calibration images and positions) of its pre-activation output error, in the
        channels where it is significant (``bias_correction_z``).
      bias_correction_z: a channel's mean shift is corrected only where ``|mean| > z * std_err``
        (``std_err`` over the per-image means; :func:`cfws_jax.ptq.reconstruct.significant_shift`);
        0 corrects every channel.
      reconstruct: after calibration, learn every quantized layer's weight rounding on the
        calibration images (:func:`cfws_jax.ptq.adaround.reconstruct_layer`); with
        ``bias_correction`` too, each layer is corrected after its reconstruction.
      recon_iters / recon_batch_size / recon_lr / recon_reg_weight: Adam steps per layer (or
        unit), images per step, learning rate, weight of the rounding regularizer
        (``recon_iters=0`` keeps round-to-nearest). The defaults (200 steps at 1e-2) fit a 2-core
        CPU; AdaRound's own schedule is 10-20k steps at 1e-3 (Adam moves a rounding variable by
        about the learning rate per step, and flipping a rounding takes a move of ~0.5).
      recon_loss: ``"mse"`` or ``"mae"`` of the layer output against the float one.
      recon_qdrop: QDrop probability (each element of a layer's input falls back to float).
      recon_act_step: also learn the step (amax) of the layer's ``:in`` quantizer (LSQ-style).
      cle: cross-layer equalization of the fused float weights before anything else
        (:func:`cfws_jax.ptq.equalize.cross_layer_equalize`); the stored layers are the equalized
        ones, and ``meta["cle"]`` records the pairs, sweeps and skipped layers.
      recon_unit: ``"block"`` (a YOLOv6 RepBlock's layers are reconstructed jointly, BRECQ-style, and
        so are a depthwise conv and the pointwise conv reading it, MobileOne; every other layer
        alone) or ``"layer"`` (every layer alone); the same for RepVGG.
    """

    w_bits: int = 8
    a_bits: int = 8
    per_channel: bool = True
    rounding: str = "half_even"
    cfws: bool = True
    cfws_extract_center: bool = True
    cfws_coarse: str = "channel"
    cfws_grouped: bool = True
    rep_w_bits: int | None = None
    act_method: str = "kl_cfws"
    other_act_method: str | None = None
    input_method: str = "max"
    percentile: float = 99.99
    num_bins: int = 2048
    relu_fusion: bool = True
    act_unsigned: bool = False
    act_full_range: bool = False
    cfws_branch_quant: bool = False
    int_bias: bool = False
    calib_order: str = "sequential"
    quantize_input: bool = True
    quantize_first_layer: bool = True
    quantize_last_layer: bool = True
    float_layers: tuple[str, ...] = ()
    bias: str = "float"
    num_calib_images: int = 32
    calib_batch_size: int = 32
    seed: int = 0
    bias_correction: bool = False
    bias_correction_z: float = 2.0
    reconstruct: bool = False
    recon_iters: int = 200
    recon_batch_size: int = 32
    recon_lr: float = 1e-2
    recon_reg_weight: float = 0.01
    recon_loss: str = "mse"
    recon_qdrop: float = 0.0
    recon_act_step: bool = False
    recon_unit: str = "block"
    cle: bool = False

    def __post_init__(self):
        for f in ("w_bits", "a_bits"):
            v = getattr(self, f)
            if not 2 <= v <= 16:
                raise ValueError(f"QuantConfig.{f} must be in 2..16, got {v}")
        if self.rep_w_bits is not None and not 2 <= self.rep_w_bits <= 16:
            raise ValueError(f"QuantConfig.rep_w_bits must be in 2..16, got {self.rep_w_bits}")
        for f in ("act_method", "other_act_method", "input_method"):
            v = getattr(self, f)
            if v is not None and v not in METHODS:
                raise ValueError(f"QuantConfig.{f} must be one of {METHODS}, got {v!r}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"QuantConfig.rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        if self.calib_order not in ("sequential", "parallel"):
            raise ValueError(f"QuantConfig.calib_order must be 'sequential' or 'parallel', got {self.calib_order!r}")
        if self.cfws_coarse not in ("channel", "tensor"):
            raise ValueError(f"QuantConfig.cfws_coarse must be 'channel' or 'tensor', got {self.cfws_coarse!r}")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"QuantConfig.bias must be one of {BIAS_MODES}, got {self.bias!r}")
        if self.num_calib_images < 1 or self.calib_batch_size < 1:
            raise ValueError("QuantConfig.num_calib_images and calib_batch_size must be >= 1")
        check_recon("QuantConfig", iters=("recon_iters", self.recon_iters),
                    batch_size=("recon_batch_size", self.recon_batch_size), lr=("recon_lr", self.recon_lr),
                    reg_weight=("recon_reg_weight", self.recon_reg_weight), loss=("recon_loss", self.recon_loss),
                    qdrop=("recon_qdrop", self.recon_qdrop))
        if not (math.isfinite(self.bias_correction_z) and self.bias_correction_z >= 0):
            raise ValueError(f"QuantConfig.bias_correction_z must be a finite number >= 0, got {self.bias_correction_z}")
        if self.recon_unit not in RECON_UNITS:
            raise ValueError(f"QuantConfig.recon_unit must be one of {RECON_UNITS}, got {self.recon_unit!r}")
        if (self.cfws_branch_quant or self.act_full_range or self.int_bias) and (self.reconstruct or self.bias_correction):
            raise ValueError("QuantConfig.cfws_branch_quant / act_full_range / int_bias do not support reconstruct or "
                             "bias_correction")
        object.__setattr__(self, "float_layers", tuple(self.float_layers))

    def replace(self, **changes) -> "QuantConfig":
        return dataclasses.replace(self, **changes)

    def method_for(self, rep: bool) -> str:
        """Activation method of a layer's output (rep conv or not)."""
        return self.act_method if rep else (self.other_act_method or self.act_method)

    def keeps_float(self, layer: str) -> bool:
        return any(fnmatch.fnmatchcase(layer, pat) for pat in self.float_layers)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown QuantConfig fields {unknown}")
        d = dict(d)
        d["float_layers"] = tuple(d.get("float_layers", ()))
        return cls(**d)


_VANILLA = dict(cfws=False, relu_fusion=False)

PRESETS: dict[str, QuantConfig] = {
    "minmax": QuantConfig(act_method="max", **_VANILLA),
    "kl": QuantConfig(act_method="entropy", **_VANILLA),
    "cfws_minmax": QuantConfig(act_method="max"),
    "cfws_kl": QuantConfig(act_method="kl_cfws"),
    "only_rep_kl": QuantConfig(act_method="kl_cfws", other_act_method="max"),
    "int16_weights": QuantConfig(cfws=False, rep_w_bits=16, act_method="kl_cfws"),
    "cfws_no_center": QuantConfig(cfws_extract_center=False, act_method="kl_cfws"),
    "cfws_tensor_coarse": QuantConfig(cfws_coarse="tensor", act_method="kl_cfws"),
}
PRESETS["cfws_kl_reponly"] = PRESETS["only_rep_kl"]
# the onnxruntime integer layout (issue #22): unsigned ReLU-fused points, CFWS branches requantized
# (parallel calibration: 90.9 % on the shipped CIFAR RepVGG-A0, sequential 83.75 %; README);
# depthwise convs plain (MobileOne-S0 held-out logit cosine 0.63 with CFWS branch points, 0.91 without)
_ORT = dict(act_unsigned=True, act_full_range=True, cfws_branch_quant=True, int_bias=True, calib_order="parallel",
            cfws_grouped=False)
PRESETS["cfws_kl_ort"] = QuantConfig(act_method="kl_cfws", **_ORT)
PRESETS["cfws_minmax_ort"] = QuantConfig(act_method="max", **_ORT)
# the same layout without the CFWS split: one QLinearConv per layer, onnxruntime's own file's speed
PRESETS["kl_ort"] = QuantConfig(cfws=False, act_method="kl_cfws", **_ORT)
# beyond the paper (issue #14): bias correction / learned rounding after calibration
PRESETS["cfws_kl_bc"] = QuantConfig(act_method="kl_cfws", bias_correction=True)
PRESETS["cfws_kl_recon"] = QuantConfig(act_method="kl_cfws", reconstruct=True, num_calib_images=256)
PRESETS["kl_recon"] = QuantConfig(cfws=False, act_method="kl_cfws", reconstruct=True, num_calib_images=256)
# issue #24: cross-layer equalization first
PRESETS["cfws_kl_cle"] = QuantConfig(act_method="kl_cfws", cle=True)
# issue #24: unsigned codes after a ReLU (one more bit where values are >= 0; below 8 bits)
PRESETS["cfws_kl_u"] = PRESETS["cfws_kl"].replace(act_unsigned=True)
PRESETS["cfws_kl_recon_u"] = PRESETS["cfws_kl_recon"].replace(act_unsigned=True)


def get_preset(name: str, **overrides) -> QuantConfig:
    """A named preset, optionally with fields replaced (``get_preset("cfws_kl", a_bits=6)``)."""
    try:
        cfg = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None
    return cfg.replace(**overrides) if overrides else cfg

"""YOLOv6 architecture configs (FORMATS.md §4.3, §4.5; FORMATS_YOLOV6_LARGE.md §4.13;
FORMATS_YOLOV6_QA.md §4.26), computed from depth / width multipliers.

Base lists, P5 (every n / t / s / m / l release): backbone repeats ``[1, 6, 12, 18, 6]``, channels
``[64, 128, 256, 512, 1024]``; neck repeats ``[12] * 4``, channels ``[256, 128, 128, 256, 256, 512]``.
P6 (n6 / s6 / m6 / l6): backbone repeats ``[1, 6, 12, 18, 6, 6]``, channels
``[64, 128, 256, 512, 768, 1024]``; neck repeats ``[12] * 6``, channels
``[512, 256, 128, 256, 512, 1024]``.

* ``num_repeat[i] = max(round(r * depth), 1)`` for ``r > 1`` else ``r`` (Python round: banker's);
* ``channels_list[i] = ceil(c * width / 8) * 8`` (P5: 11 entries, 5 backbone + 6 neck; P6: 12, 6 + 6).

``head``: ``"v1"`` (YOLOX-style: ``obj_preds``, grid + exp-wh decode) or ``"v2"`` (anchor points,
ltrb distances; v2.0 and v3.0). ``reg_max``: 0 for 4-channel ltrb boxes, 16 for DFL boxes
(``4 * (reg_max + 1)`` channels). ``fuse_p2`` / ``cspsppf`` / ``bifpn``: the v3.0 backbone
(P2 output, SimCSPSPPF) and neck (BiFusion). ``block`` is upstream's ``training_mode`` (the
basic block); ``csp_e`` set means BepC3 stages (CSPBepBackbone / CSP necks); ``p6`` the
six-stage backbone, P6 neck and four-level head (strides 8 / 16 / 32 / 64).

Module kinds a config resolves to (:attr:`YOLOv6Config.backbone_kind`, :attr:`~YOLOv6Config.neck_kind`):

============================  ===========================  ====================================
models                        backbone                     neck
============================  ===========================  ====================================
n/t/s v1-v3, *_qa n/s         EfficientRep                 RepPANNeck / RepBiFPANNeck
m/l v2, l_relu v2, base       CSPBepBackbone (no P2)       CSPRepPANNeck
m/l v3, m_qa                  CSPBepBackbone (P2)          CSPRepBiFPANNeck
n6 / s6                       EfficientRep6                RepBiFPANNeck6
m6 / l6                       CSPBepBackbone_P6            CSPRepBiFPANNeck_P6
============================  ===========================  ====================================
"""

from __future__ import annotations

import dataclasses
import math

BASE_BACKBONE_REPEATS = (1, 6, 12, 18, 6)
BASE_NECK_REPEATS = (12, 12, 12, 12)
BASE_BACKBONE_CHANNELS = (64, 128, 256, 512, 1024)
BASE_NECK_CHANNELS = (256, 128, 128, 256, 256, 512)
P6_BACKBONE_REPEATS = (1, 6, 12, 18, 6, 6)
P6_NECK_REPEATS = (12, 12, 12, 12, 12, 12)
P6_BACKBONE_CHANNELS = (64, 128, 256, 512, 768, 1024)
P6_NECK_CHANNELS = (512, 256, 128, 256, 512, 1024)

# upstream training_mode -> basic block: "repvgg" RepVGGBlock, "qarepvgg" / "qarepvggv2"
# QARepVGGBlock / V2, "conv_silu" ConvWrapper (biased 3x3 conv + BN + SiLU), "conv_relu"
# SimConvWrapper (same with ReLU).
BLOCKS = ("repvgg", "qarepvgg", "qarepvggv2", "conv_silu", "conv_relu")


def scale_repeats(depth: float, repeats=BASE_BACKBONE_REPEATS + BASE_NECK_REPEATS) -> tuple[int, ...]:
    """``max(round(r * depth), 1)`` for ``r > 1`` else ``r`` (banker's rounding, as upstream)."""
    return tuple(max(round(r * depth), 1) if r > 1 else r for r in repeats)


def scale_channels(width: float, channels=BASE_BACKBONE_CHANNELS + BASE_NECK_CHANNELS) -> tuple[int, ...]:
    """``ceil(c * width / 8) * 8`` for every entry."""
    return tuple(math.ceil(c * width / 8) * 8 for c in channels)


@dataclasses.dataclass(frozen=True)
class YOLOv6Config:
    """One YOLOv6 detector variant.

    Attributes:
      depth, width: the multipliers of the config file.
      head: ``"v1"`` (objectness, exp-wh) or ``"v2"`` (ltrb, v2.0 / v3.0).
      fuse_p2: backbone also returns P2 (v3.0; always for P6). cspsppf: the SPPF-family block
        is (Sim)CSPSPPF, else (Sim)SPPF. bifpn: BiFusion neck (v3.0), else PAN (v1.0 / v2.0).
      num_classes: classes (``cls_preds`` outputs).
      reg_max: 0 (4 ltrb / xywh channels) or 16 (DFL, ``4 * 17`` channels).
      block: the basic block (one of :data:`BLOCKS`, upstream ``training_mode``).
      csp_e: BepC3 expansion (``c_ = int(cout * csp_e)``) of every backbone and neck stage, or
        None for RepBlock stages.
      p6: six backbone stages, P6 neck, four head levels (strides 8 / 16 / 32 / 64).
    """

    depth: float
    width: float
    head: str = "v2"
    fuse_p2: bool = False
    cspsppf: bool = False
    bifpn: bool = False
    num_classes: int = 80
    reg_max: int = 0
    block: str = "repvgg"
    csp_e: float | None = None
    p6: bool = False

    def __post_init__(self):
        if self.head not in ("v1", "v2"):
            raise ValueError(f"YOLOv6Config.head must be 'v1' or 'v2', got {self.head!r}")
        if self.head == "v1" and self.reg_max:
            raise ValueError("YOLOv6Config: the v1 head has no DFL (reg_max must be 0)")
        if self.block not in BLOCKS:
            raise ValueError(f"YOLOv6Config.block must be one of {BLOCKS}, got {self.block!r}")
        if self.csp_e is not None and not 0 < self.csp_e <= 1:
            raise ValueError(f"YOLOv6Config.csp_e must be in (0, 1] or None, got {self.csp_e!r}")
        if self.p6 and not (self.bifpn and self.fuse_p2 and self.head == "v2"):
            raise ValueError("YOLOv6Config: p6 models need bifpn=True, fuse_p2=True and the v2 head")

    @property
    def num_repeat(self) -> tuple[int, ...]:
        """Scaled repeats: P5 9 (stem, ERBlock_2..5, neck Rep_p4, Rep_p3, Rep_n3, Rep_n4);
        P6 12 (stem, ERBlock_2..6, neck Rep_p5, Rep_p4, Rep_p3, Rep_n4, Rep_n5, Rep_n6)."""
        if self.p6:
            return scale_repeats(self.depth, P6_BACKBONE_REPEATS + P6_NECK_REPEATS)
        return scale_repeats(self.depth)

    @property
    def channels_list(self) -> tuple[int, ...]:
        """Scaled channels: P5 11 (stem, ERBlock_2..5 outputs, then neck ch5..ch10); P6 12
        (stem, ERBlock_2..6, then neck ch6..ch11)."""
        if self.p6:
            return scale_channels(self.width, P6_BACKBONE_CHANNELS + P6_NECK_CHANNELS)
        return scale_channels(self.width)

    @property
    def reg_channels(self) -> int:
        return 4 * (self.reg_max + 1)

    @property
    def strides(self) -> tuple[int, ...]:
        """Head level strides: (8, 16, 32) or, P6, (8, 16, 32, 64)."""
        return (8, 16, 32, 64) if self.p6 else (8, 16, 32)

    @property
    def act(self) -> str:
        """Activation of BepC3 1x1 convs and the SPPF-family block: SiLU iff ``block == "conv_silu"``."""
        return "silu" if self.block == "conv_silu" else "relu"

    @property
    def backbone_kind(self) -> str:
        """Upstream backbone class name (see the module docstring)."""
        if self.p6:
            return "CSPBepBackbone_P6" if self.csp_e else "EfficientRep6"
        return "CSPBepBackbone" if self.csp_e else "EfficientRep"

    @property
    def neck_kind(self) -> str:
        """Upstream neck class name (see the module docstring)."""
        if self.p6:
            return "CSPRepBiFPANNeck_P6" if self.csp_e else "RepBiFPANNeck6"
        name = "RepBiFPANNeck" if self.bifpn else "RepPANNeck"
        return "CSP" + name if self.csp_e else name


_V1 = dict(head="v1")
_V3 = dict(fuse_p2=True, cspsppf=True, bifpn=True)
_CSP2 = dict(reg_max=16)                           # v2.0 m / l: CSPBep + CSPRepPAN, DFL head
_CSP3 = dict(fuse_p2=True, bifpn=True, reg_max=16)  # v3.0 m / l: CSPBep (P2) + CSPRepBiFPAN
_P6 = dict(fuse_p2=True, bifpn=True, p6=True)

YOLOV6_CONFIGS: dict[str, YOLOv6Config] = {
    "yolov6n_v1": YOLOv6Config(0.33, 0.25, **_V1),
    "yolov6t_v1": YOLOv6Config(0.25, 0.50, **_V1),
    "yolov6s_v1": YOLOv6Config(0.33, 0.50, **_V1),
    "yolov6n_v2": YOLOv6Config(0.33, 0.25),
    "yolov6t_v2": YOLOv6Config(0.33, 0.375),
    "yolov6s_v2": YOLOv6Config(0.33, 0.50),
    "yolov6n_v3": YOLOv6Config(0.33, 0.25, **_V3),
    "yolov6s_v3": YOLOv6Config(0.33, 0.50, **_V3),
    # v2.0 (tag 0.2.0) and the 0.2.1 base models (LARGE §4.13)
    "yolov6m_v2": YOLOv6Config(0.60, 0.75, csp_e=2 / 3, **_CSP2),
    "yolov6l_v2": YOLOv6Config(1.0, 1.0, csp_e=1 / 2, block="conv_silu", **_CSP2),
    "yolov6l_relu_v2": YOLOv6Config(1.0, 1.0, csp_e=1 / 2, **_CSP2),
    "yolov6m_base": YOLOv6Config(0.80, 0.75, csp_e=1 / 2, block="conv_relu", **_CSP2),
    "yolov6l_base": YOLOv6Config(1.0, 1.0, csp_e=1 / 2, block="conv_relu", **_CSP2),
    # v3.0 (tag 0.3.0)
    "yolov6m_v3": YOLOv6Config(0.60, 0.75, csp_e=2 / 3, **_CSP3),
    "yolov6l_v3": YOLOv6Config(1.0, 1.0, csp_e=1 / 2, block="conv_silu", **_CSP3),
    "yolov6n6": YOLOv6Config(0.33, 0.25, cspsppf=True, **_P6),
    "yolov6s6": YOLOv6Config(0.33, 0.50, cspsppf=True, **_P6),
    "yolov6m6": YOLOv6Config(0.60, 0.75, csp_e=2 / 3, reg_max=16, **_P6),
    "yolov6l6": YOLOv6Config(1.0, 1.0, csp_e=1 / 2, block="conv_silu", reg_max=16, **_P6),
    # QARepVGG (QA §4.26): the v3.0 n / s / m configs with QA basic blocks; ``*_qa`` = V1 (the
    # released 0.3.0 files, QA §4.21), ``*_qav2`` = QARepVGGBlockV2 (configs at 0.4.0 / HEAD).
    "yolov6n_qa": YOLOv6Config(0.33, 0.25, block="qarepvgg", **_V3),
    "yolov6s_qa": YOLOv6Config(0.33, 0.50, block="qarepvgg", **_V3),
    "yolov6m_qa": YOLOv6Config(0.60, 0.75, csp_e=2 / 3, block="qarepvgg", **_CSP3),
    "yolov6n_qav2": YOLOv6Config(0.33, 0.25, block="qarepvggv2", **_V3),
    "yolov6s_qav2": YOLOv6Config(0.33, 0.50, block="qarepvggv2", **_V3),
    "yolov6m_qav2": YOLOv6Config(0.60, 0.75, csp_e=2 / 3, block="qarepvggv2", **_CSP3),
}

"""YOLOv6 architecture configs (FORMATS.md §4.3, §4.5), computed from depth / width multipliers.

Base (every n / t / s release): backbone repeats ``[1, 6, 12, 18, 6]``, channels
``[64, 128, 256, 512, 1024]``; neck repeats ``[12, 12, 12, 12]``, channels
``[256, 128, 128, 256, 256, 512]``.

* ``num_repeat[i] = max(round(r * depth), 1)`` for ``r > 1`` else ``r`` (Python round: banker's);
* ``channels_list[i] = ceil(c * width / 8) * 8`` (11 entries: 5 backbone, 6 neck).

``head``: ``"v1"`` (YOLOX-style: ``obj_preds``, grid + exp-wh decode) or ``"v2"`` (anchor points,
ltrb distances; v2.0 and v3.0). ``reg_max``: 0 for 4-channel ltrb boxes, 16 for DFL boxes
(``4 * (reg_max + 1)`` channels). ``fuse_p2`` / ``cspsppf`` / ``bifpn``: the v3.0 backbone
(P2 output, SimCSPSPPF) and neck (RepBiFPANNeck).
"""

from __future__ import annotations

import dataclasses
import math

BASE_BACKBONE_REPEATS = (1, 6, 12, 18, 6)
BASE_NECK_REPEATS = (12, 12, 12, 12)
BASE_BACKBONE_CHANNELS = (64, 128, 256, 512, 1024)
BASE_NECK_CHANNELS = (256, 128, 128, 256, 256, 512)


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
      fuse_p2: backbone also returns P2 (v3.0). cspsppf: ``ERBlock_5_2`` is SimCSPSPPF (v3.0),
        else SimSPPF. bifpn: RepBiFPANNeck (v3.0), else RepPANNeck.
      num_classes: classes (``cls_preds`` outputs).
      reg_max: 0 (4 ltrb / xywh channels) or 16 (DFL, ``4 * 17`` channels).
    """

    depth: float
    width: float
    head: str = "v2"
    fuse_p2: bool = False
    cspsppf: bool = False
    bifpn: bool = False
    num_classes: int = 80
    reg_max: int = 0

    def __post_init__(self):
        if self.head not in ("v1", "v2"):
            raise ValueError(f"YOLOv6Config.head must be 'v1' or 'v2', got {self.head!r}")
        if self.head == "v1" and self.reg_max:
            raise ValueError("YOLOv6Config: the v1 head has no DFL (reg_max must be 0)")

    @property
    def num_repeat(self) -> tuple[int, ...]:
        """9 scaled repeats: backbone stem, ERBlock_2..5, neck Rep_p4, Rep_p3, Rep_n3, Rep_n4."""
        return scale_repeats(self.depth)

    @property
    def channels_list(self) -> tuple[int, ...]:
        """11 scaled channels: backbone stem, ERBlock_2..5 outputs, then neck ch5..ch10."""
        return scale_channels(self.width)

    @property
    def reg_channels(self) -> int:
        return 4 * (self.reg_max + 1)


_V1 = dict(head="v1")
_V3 = dict(fuse_p2=True, cspsppf=True, bifpn=True)

YOLOV6_CONFIGS: dict[str, YOLOv6Config] = {
    "yolov6n_v1": YOLOv6Config(0.33, 0.25, **_V1),
    "yolov6t_v1": YOLOv6Config(0.25, 0.50, **_V1),
    "yolov6s_v1": YOLOv6Config(0.33, 0.50, **_V1),
    "yolov6n_v2": YOLOv6Config(0.33, 0.25),
    "yolov6t_v2": YOLOv6Config(0.33, 0.375),
    "yolov6s_v2": YOLOv6Config(0.33, 0.50),
    "yolov6n_v3": YOLOv6Config(0.33, 0.25, **_V3),
    "yolov6s_v3": YOLOv6Config(0.33, 0.50, **_V3),
}

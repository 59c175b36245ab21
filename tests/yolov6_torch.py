"""Test-only PyTorch YOLOv6 peers: the ``yolov6detect`` network (tag 0.3.0 code, FORMATS.md §5.2),
plus emulations written here from FORMATS.md §4 (no YOLOv6 code):

* ``V1Detect``: the v1.0 (tag 0.1.0) objectness head, pickled as ``yolov6.models.effidehead.Detect``;
* 0.4.x module classes (``ConvModule``, ``ConvBNReLU``, ``ConvBNSiLU``, ``SPPFModule``, ``SimSPPF``,
  ``CSPSPPFModule``, ``SimCSPSPPF``) with the 0.4.x key nesting (``.block.conv.``, ``.sppf.``,
  ``.cspsppf.``), pickled under ``yolov6.layers.common``.

``save_release`` writes files the way releases are saved (engine dict, fp16 module). Layouts: torch
NCHW; ``predict`` takes NHWC float32 and returns the decoded ``[B, N, 5 + nc]``.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import sys
import types

import numpy as np
import torch
from torch import nn

BASE = dict(backbone_repeats=[1, 6, 12, 18, 6], backbone_channels=[64, 128, 256, 512, 1024],
            neck_repeats=[12, 12, 12, 12], neck_channels=[256, 128, 128, 256, 256, 512])

# name -> (depth, width, v3 backbone/neck, head "v1"/"v2")
VARIANTS = {
    "yolov6n_v1": (0.33, 0.25, False, "v1"), "yolov6t_v1": (0.25, 0.50, False, "v1"),
    "yolov6s_v1": (0.33, 0.50, False, "v1"),
    "yolov6n_v2": (0.33, 0.25, False, "v2"), "yolov6t_v2": (0.33, 0.375, False, "v2"),
    "yolov6s_v2": (0.33, 0.50, False, "v2"),
    "yolov6n_v3": (0.33, 0.25, True, "v2"), "yolov6s_v3": (0.33, 0.50, True, "v2"),
}


def import_yolov6():
    """The installed ``yolov6`` package without running its ``__init__`` (FORMATS.md §5.2)."""
    mod = sys.modules.get("yolov6")
    if mod is None or not getattr(mod, "__path__", None):
        spec = importlib.util.find_spec("yolov6")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("yolov6detect is not installed (pip install --no-deps yolov6detect==0.4.1)")
        mod = types.ModuleType("yolov6")
        mod.__path__ = list(spec.submodule_search_locations)
        sys.modules["yolov6"] = mod
    import yolov6.layers.common  # noqa: F401
    import yolov6.models.effidehead  # noqa: F401
    import yolov6.models.yolo  # noqa: F401

    return sys.modules["yolov6"]


def _config(depth, width, v3, distill):
    from addict import Dict

    backbone = dict(type="EfficientRep", num_repeats=BASE["backbone_repeats"],
                    out_channels=BASE["backbone_channels"])
    if v3:
        backbone.update(fuse_P2=True, cspsppf=True)
    return Dict(training_mode="repvgg", model=dict(
        type="YOLOv6", depth_multiple=depth, width_multiple=width, backbone=backbone,
        neck=dict(type="RepBiFPANNeck" if v3 else "RepPANNeck", num_repeats=BASE["neck_repeats"],
                  out_channels=BASE["neck_channels"]),
        head=dict(type="EffiDeHead", num_layers=3, strides=[8, 16, 32],
                  use_dfl=distill, reg_max=16 if distill else 0)))


class V1Detect(nn.Module):
    """v1.0 head from FORMATS.md §4.4: stems / cls_convs / reg_convs (Conv-BN-SiLU), 1x1 preds
    ``cls`` (nc), ``reg`` (4), ``obj`` (1, on the reg feature). Eval output per anchor:
    ``[(reg_xy + grid) * s, exp(reg_wh) * s, sigmoid(obj), sigmoid(cls)]``, grid ``(x, y)``."""

    def __init__(self, channels, num_classes):
        super().__init__()
        from yolov6.layers.common import Conv

        self.nc, self.no, self.nl = num_classes, num_classes + 5, len(channels)
        self.stride = torch.tensor([8.0, 16.0, 32.0])
        self.grid = [torch.zeros(1)] * self.nl  # Model._apply maps it
        self.stems, self.cls_convs, self.reg_convs = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        self.cls_preds, self.reg_preds, self.obj_preds = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for c in channels:
            self.stems.append(Conv(c, c, 1, 1))
            self.cls_convs.append(Conv(c, c, 3, 1))
            self.reg_convs.append(Conv(c, c, 3, 1))
            self.cls_preds.append(nn.Conv2d(c, num_classes, 1))
            self.reg_preds.append(nn.Conv2d(c, 4, 1))
            self.obj_preds.append(nn.Conv2d(c, 1, 1))
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eps = 1e-3

    def forward(self, x):
        outs = []
        for i in range(self.nl):
            f = self.stems[i](x[i])
            cf, rf = self.cls_convs[i](f), self.reg_convs[i](f)
            y = torch.cat([self.reg_preds[i](rf), self.obj_preds[i](rf).sigmoid(),
                           self.cls_preds[i](cf).sigmoid()], 1)
            b, _, h, w = y.shape
            y = y.flatten(2).permute(0, 2, 1)
            gy, gx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            grid = torch.stack([gx, gy], -1).reshape(1, h * w, 2).to(y.dtype)
            s = self.stride[i].to(y.dtype)
            outs.append(torch.cat([(y[..., :2] + grid) * s, torch.exp(y[..., 2:4]) * s, y[..., 4:]], -1))
        return torch.cat(outs, 1)


V1Detect.__module__, V1Detect.__qualname__, V1Detect.__name__ = "yolov6.models.effidehead", "Detect", "Detect"


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Random conv / transpose weights and biases and BN affine / statistics; model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.6 + 0.4)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                fan_in = m.weight.shape[1] * m.weight.shape[2] * m.weight.shape[3]
                if isinstance(m, nn.ConvTranspose2d):
                    fan_in = m.weight.shape[0]
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / fan_in ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model.eval()


def build(name: str, *, num_classes: int = 80, distill: bool = False, seed: int = 0) -> nn.Module:
    """Randomised float32 eval-mode torch model of registry name ``name`` whose weights are exactly
    fp16-representable (as in a release file). ``distill``: the v3.0 distilled head."""
    import_yolov6()
    from yolov6.models.yolo import build_model

    depth, width, v3, head = VARIANTS[name]
    model = build_model(_config(depth, width, v3, distill), num_classes, "cpu", distill_ns=distill)
    if head == "v1":
        ch = [m.conv.in_channels for m in model.detect.stems]
        model.detect = V1Detect(ch, num_classes)
    randomize(model, seed)
    with torch.no_grad():
        for conv in model.detect.cls_preds:  # spread the class scores over (0, 1) (distinct NMS ranks)
            conv.weight.mul_(8.0)
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.half().float())
    return model


def predict(model: nn.Module, x_nhwc: np.ndarray) -> np.ndarray:
    """Decoded eval-mode predictions ``[B, N, 5 + nc]`` of a torch model for NHWC input."""
    with torch.no_grad():
        y = model(torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))))
    return (y[0] if isinstance(y, (list, tuple)) else y).numpy()


def deploy(model: nn.Module) -> nn.Module:
    """Upstream deploy path (§4.8): fold plain conv BNs, then ``switch_to_deploy`` every RepVGG block."""
    from yolov6.layers.common import RepVGGBlock
    from yolov6.utils.torch_utils import fuse_model

    model = fuse_model(copy.deepcopy(model))
    for m in model.modules():
        if isinstance(m, RepVGGBlock):
            m.switch_to_deploy()
    return model.eval()


# ----------------------------------------------------------------------------- 0.4.x emulation

def _official(cls, name):
    cls.__module__, cls.__qualname__, cls.__name__ = "yolov6.layers.common", name, name
    return cls


class ConvModule(nn.Module):
    """0.4.x ``ConvModule``: ``conv``, ``bn`` and (optional) ``act``."""

    def __init__(self, conv, bn, act=None):
        super().__init__()
        self.conv, self.bn = conv, bn
        if act is not None:
            self.act = act

    def forward(self, x):
        y = self.bn(self.conv(x))
        return self.act(y) if hasattr(self, "act") else y


class _Wrapped(nn.Module):
    """0.4.x ``ConvBNReLU`` / ``ConvBNSiLU``: the ConvModule under ``block``."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(x)


class ConvBNReLU(_Wrapped):
    pass


class ConvBNSiLU(_Wrapped):
    pass


class SPPFModule(nn.Module):
    def __init__(self, cv1, cv2, m):
        super().__init__()
        self.cv1, self.cv2, self.m = cv1, cv2, m

    def forward(self, x):
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat([x, y1, y2, self.m(y2)], 1))


class SimSPPF(nn.Module):
    def __init__(self, sppf):
        super().__init__()
        self.sppf = sppf

    def forward(self, x):
        return self.sppf(x)


class CSPSPPFModule(nn.Module):
    def __init__(self, src, convert):
        super().__init__()
        for i in range(1, 8):
            setattr(self, f"cv{i}", convert(getattr(src, f"cv{i}")))
        self.m = src.m

    def forward(self, x):
        x1 = self.cv4(self.cv3(self.cv1(x)))
        y0 = self.cv2(x)
        y1 = self.m(x1)
        y2 = self.m(y1)
        y3 = self.cv6(self.cv5(torch.cat([x1, y1, y2, self.m(y2)], 1)))
        return self.cv7(torch.cat([y0, y3], 1))


class SimCSPSPPF(nn.Module):
    def __init__(self, cspsppf):
        super().__init__()
        self.cspsppf = cspsppf

    def forward(self, x):
        return self.cspsppf(x)


V04_CLASSES = {c.__name__: _official(c, c.__name__) for c in
               (ConvModule, ConvBNReLU, ConvBNSiLU, SPPFModule, SimSPPF, CSPSPPFModule, SimCSPSPPF)}


def to_v04(model: nn.Module) -> nn.Module:
    """Copy of a (0.3.0-code) model re-nested as 0.4.x pickles it: SimConv -> ConvBNReLU(ConvModule),
    Conv -> ConvBNSiLU(ConvModule), SimSPPF -> SimSPPF(sppf=SPPFModule), SimCSPSPPF ->
    SimCSPSPPF(cspsppf=CSPSPPFModule), RepVGG branches -> ConvModule. Same tensors, same function."""
    common = import_yolov6().layers.common
    real = {n: getattr(common, n) for n in ("Conv", "SimConv", "SimSPPF", "SimCSPSPPF", "RepVGGBlock")}

    def convert(m):
        t = type(m)
        if t is real["SimConv"]:
            return ConvBNReLU(ConvModule(m.conv, m.bn, m.act))
        if t is real["Conv"]:
            return ConvBNSiLU(ConvModule(m.conv, m.bn, m.act))
        if t is real["SimSPPF"]:
            return SimSPPF(SPPFModule(convert(m.cv1), convert(m.cv2), m.m))
        if t is real["SimCSPSPPF"]:
            return SimCSPSPPF(CSPSPPFModule(m, convert))
        if t is real["RepVGGBlock"]:
            for br in ("rbr_dense", "rbr_1x1"):
                seq = getattr(m, br)
                setattr(m, br, ConvModule(seq.conv, seq.bn))
            return m
        for name, child in list(m.named_children()):
            setattr(m, name, convert(child))
        return m

    return convert(copy.deepcopy(model))


@contextlib.contextmanager
def official_names(classes):
    """Make ``classes`` (with official ``__module__``/``__qualname__``) resolvable while pickling."""
    saved = []
    for cls in classes:
        mod = sys.modules[cls.__module__]
        saved.append((mod, cls.__qualname__, getattr(mod, cls.__qualname__, None)))
        setattr(mod, cls.__qualname__, cls)
    try:
        yield
    finally:
        for mod, name, old in reversed(saved):
            setattr(mod, name, old)


def save_release(model: nn.Module, path, *, engine: bool = False, v04: bool = False) -> None:
    """``torch.save`` like YOLOv6: ``{'model': fp16 module, 'ema', 'updates', 'optimizer', 'epoch'}``.

    Release form (default): EMA moved into ``model``, the rest None. ``engine``: ``ema`` holds the
    module too and HEAD's ``scheduler`` / ``results`` (NumPy float64 scalars) are written.
    ``v04``: the 0.4.x module nesting (:func:`to_v04`).
    """
    m = to_v04(model) if v04 else copy.deepcopy(model)
    m = m.half()
    ckpt = {"model": m, "ema": None, "updates": None, "optimizer": None, "epoch": -1}
    if engine:
        ckpt.update(ema=copy.deepcopy(m), updates=1234, epoch=299, scheduler=None,
                    results=(np.float64(0.51), np.float64(0.33)))
    classes = list(V04_CLASSES.values()) if v04 else []
    if isinstance(model.detect, V1Detect):
        classes.append(V1Detect)
    with official_names(classes):
        torch.save(ckpt, path)

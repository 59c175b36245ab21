"""Test-only PyTorch YOLOv6 peers: the ``yolov6detect`` network (tag 0.3.0 code, FORMATS.md §5.2),
plus emulations written here from FORMATS.md §4 (no YOLOv6 code):

* ``V1Detect``: the v1.0 (tag 0.1.0) objectness head, pickled as ``yolov6.models.effidehead.Detect``;
* 0.4.x module classes (``ConvModule``, ``ConvBNReLU``, ``ConvBNSiLU``, ``SPPFModule``, ``SimSPPF``,
  ``SPPF``, ``CSPSPPFModule``, ``SimCSPSPPF``, ``CSPSPPF``) with the 0.4.x key nesting
  (``.block.conv.``, ``.sppf.``, ``.cspsppf.``; ConvWrapper basic blocks lose their conv bias),
  pickled under ``yolov6.layers.common``;
* ``QARepVGGBlock`` / ``QARepVGGBlockV2`` (FORMATS_YOLOV6_QA.md §4.23-4.25; not in the peer),
  swapped in for every RepVGGBlock of a plain model.

The M / L / L-ReLU / base / P6 models (FORMATS_YOLOV6_LARGE.md §4.13) are built by the peer's own
classes (CSPBepBackbone, EfficientRep6, CSPBepBackbone_P6, CSPRepPANNeck, CSPRepBiFPANNeck,
RepBiFPANNeck6, CSPRepBiFPANNeck_P6; ConvWrapper / SimConvWrapper basic blocks); the v2.0 m / l
builds are the same classes without ``fuse_P2`` (LARGE §4.14.1, §4.14.3).

``save_release`` writes files the way releases are saved (engine dict, fp16 module). Layouts: torch
NCHW; ``predict`` takes NHWC float32 and returns the decoded ``[B, N, 5 + nc]``.
"""

from __future__ import annotations

import contextlib
import functools
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


# name -> LARGE §4.13 / QA §4.26 config: (depth, width, training_mode, csp_e, backbone, neck,
# fuse_P2, cspsppf, head levels, use_dfl); "qarepvgg*" modes are swapped in after the build.
_P5V2, _P5V3 = ("CSPBepBackbone", "CSPRepPANNeck", False, False), ("CSPBepBackbone", "CSPRepBiFPANNeck", True, False)
_N6, _M6 = ("EfficientRep6", "RepBiFPANNeck6", True, True), ("CSPBepBackbone_P6", "CSPRepBiFPANNeck_P6", True, False)
_NS3 = ("EfficientRep", "RepBiFPANNeck", True, True)
LARGE = {
    "yolov6m_v2": (0.60, 0.75, "repvgg", 2 / 3, *_P5V2, 3, True),
    "yolov6l_v2": (1.0, 1.0, "conv_silu", 1 / 2, *_P5V2, 3, True),
    "yolov6l_relu_v2": (1.0, 1.0, "repvgg", 1 / 2, *_P5V2, 3, True),
    "yolov6m_base": (0.80, 0.75, "conv_relu", 1 / 2, *_P5V2, 3, True),
    "yolov6l_base": (1.0, 1.0, "conv_relu", 1 / 2, *_P5V2, 3, True),
    "yolov6m_v3": (0.60, 0.75, "repvgg", 2 / 3, *_P5V3, 3, True),
    "yolov6l_v3": (1.0, 1.0, "conv_silu", 1 / 2, *_P5V3, 3, True),
    "yolov6n6": (0.33, 0.25, "repvgg", None, *_N6, 4, False),
    "yolov6s6": (0.33, 0.50, "repvgg", None, *_N6, 4, False),
    "yolov6m6": (0.60, 0.75, "repvgg", 2 / 3, *_M6, 4, True),
    "yolov6l6": (1.0, 1.0, "conv_silu", 1 / 2, *_M6, 4, True),
    "yolov6n_qa": (0.33, 0.25, "qarepvgg", None, *_NS3, 3, False),
    "yolov6s_qa": (0.33, 0.50, "qarepvgg", None, *_NS3, 3, False),
    "yolov6m_qa": (0.60, 0.75, "qarepvgg", 2 / 3, *_P5V3, 3, True),
    "yolov6n_qav2": (0.33, 0.25, "qarepvggv2", None, *_NS3, 3, False),
    "yolov6s_qav2": (0.33, 0.50, "qarepvggv2", None, *_NS3, 3, False),
    "yolov6m_qav2": (0.60, 0.75, "qarepvggv2", 2 / 3, *_P5V3, 3, True),
}
P6_BASE = dict(backbone_repeats=[1, 6, 12, 18, 6, 6], backbone_channels=[64, 128, 256, 512, 768, 1024],
               neck_repeats=[12] * 6, neck_channels=[512, 256, 128, 256, 512, 1024])


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


def _large_config(name):
    from addict import Dict

    depth, width, mode, csp_e, bb, neck, fuse_p2, cspsppf, levels, dfl = LARGE[name]
    base = P6_BASE if levels == 4 else BASE
    backbone = dict(type=bb, num_repeats=base["backbone_repeats"], out_channels=base["backbone_channels"],
                    fuse_P2=fuse_p2, cspsppf=cspsppf)
    neck_cfg = dict(type=neck, num_repeats=base["neck_repeats"], out_channels=base["neck_channels"])
    if csp_e is not None:
        backbone["csp_e"] = neck_cfg["csp_e"] = csp_e
    return Dict(training_mode="repvgg" if mode.startswith("qa") else mode, model=dict(
        type="YOLOv6", depth_multiple=depth, width_multiple=width, backbone=backbone, neck=neck_cfg,
        head=dict(type="EffiDeHead", num_layers=levels, strides=[8, 16, 32, 64][:levels],
                  use_dfl=dfl, reg_max=16 if dfl else 0)))


class QARepVGGBlock(nn.Module):
    """QARepVGGBlock (V1; ``avg``: V2) from QA §4.23: ``relu(bn(bn_d(W3*x) + W1*x [+ x] [+ avg3(x)]))``;
    keys ``rbr_dense.conv.weight``, ``rbr_dense.bn.*``, ``rbr_1x1.weight``, ``bn.*`` (QA §4.25).
    :meth:`switch_to_deploy` is upstream's deploy form: ``rbr_reparam`` = steps 1-4 of QA §4.24,
    ``bn`` (BN_post) kept and applied before the ReLU."""

    def __init__(self, cin, cout, stride=1, avg=False):
        super().__init__()
        from collections import OrderedDict

        self.rbr_dense = nn.Sequential(OrderedDict(
            conv=nn.Conv2d(cin, cout, 3, stride, 1, bias=False), bn=nn.BatchNorm2d(cout, eps=1e-3)))
        self.rbr_1x1 = nn.Conv2d(cin, cout, 1, stride, 0, bias=False)
        self.identity = cin == cout and stride == 1
        if avg:
            self.rbr_avg = nn.AvgPool2d(3, 1, 1) if self.identity else None
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)
        self.nonlinearity = nn.ReLU()

    def forward(self, x):
        if hasattr(self, "rbr_reparam"):
            return self.nonlinearity(self.bn(self.rbr_reparam(x)))
        y = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.identity:
            y = y + x
        if getattr(self, "rbr_avg", None) is not None:
            y = y + self.rbr_avg(x)
        return self.nonlinearity(self.bn(y))

    def switch_to_deploy(self):
        conv, bn = self.rbr_dense.conv, self.rbr_dense.bn
        t = bn.weight / (bn.running_var + bn.eps).sqrt()
        k = conv.weight * t[:, None, None, None]
        b = bn.bias - bn.running_mean * t
        k = k + nn.functional.pad(self.rbr_1x1.weight, [1, 1, 1, 1])
        c = torch.arange(k.shape[0])
        if self.identity:
            k[c, c, 1, 1] += 1.0
        if getattr(self, "rbr_avg", None) is not None:
            k[c, c] += 1.0 / 9
        self.rbr_reparam = nn.Conv2d(conv.in_channels, conv.out_channels, 3, conv.stride, 1, bias=True)
        self.rbr_reparam.weight.data, self.rbr_reparam.bias.data = k.detach(), b.detach()
        for attr in ("rbr_dense", "rbr_1x1", "rbr_avg"):
            if hasattr(self, attr):
                delattr(self, attr)


class QARepVGGBlockV2(QARepVGGBlock):
    def __init__(self, cin, cout, stride=1):
        super().__init__(cin, cout, stride, avg=True)


for _c in (QARepVGGBlock, QARepVGGBlockV2):  # pickled as upstream names them (QA §4.25)
    _c.__module__, _c.__qualname__ = "yolov6.layers.common", _c.__name__


def to_qa(model: nn.Module, v2: bool) -> nn.Module:
    """Swap every RepVGGBlock of ``model`` (in place) for a fresh QARepVGGBlock (``v2``: V2) of the
    same channels and stride (QA §4.22: exactly the RepVGG positions)."""
    from yolov6.layers.common import RepVGGBlock

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, RepVGGBlock):
                conv = child.rbr_dense.conv
                cls = QARepVGGBlockV2 if v2 else QARepVGGBlock
                setattr(parent, name, cls(conv.in_channels, conv.out_channels, conv.stride[0]))
    return model


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
    """Random conv / transpose weights and biases, BN affine / statistics and BottleRep ``alpha``
    (``1 ± U(0.15, 0.35)``, never 1); model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("alpha"):
                sign = 1.0 if torch.rand(1, generator=g).item() < 0.5 else -1.0
                p.fill_(1.0 + sign * (0.15 + 0.2 * torch.rand(1, generator=g).item()))
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

    if name in LARGE:
        return _build_large(name, num_classes, seed)
    else:
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


_POOL = 65521  # prime: a tensor tiled from the pool repeats no row / channel pattern


def randomize_fast(model: nn.Module, seed: int) -> nn.Module:
    """:func:`randomize` for the large models (up to 140M values) at about one copy per value:
    each tensor is a random window of a prime-length pool of normals / uniforms, scaled, rounded to
    fp16 (every value fp16-exact) and tiled. Conv / transpose weights ``N(0, 1/fan_in)``, biases
    ``N(0, 0.01)``, BN gamma ``U(0.3, 0.7)`` (keeps the 50-block L nets O(1) in float32), beta and
    mean ``N(0, 0.01)``, var ``U(0.5, 1.5)``, BottleRep ``alpha`` ``1 ± U(0.15, 0.35)`` (never 1);
    ``detect.proj`` / ``proj_conv`` are left alone; eval mode."""
    g = torch.Generator().manual_seed(seed)
    normal, uniform = torch.randn(2 * _POOL, generator=g), torch.rand(2 * _POOL, generator=g)
    offsets = torch.randint(0, _POOL, (100_000,), generator=g).tolist()

    def fill(t, pool, scale, shift=0.0):
        n = t.numel()
        off = offsets.pop()
        v = (pool[off:off + min(n, _POOL)] * scale + shift).half().float()
        if n > _POOL:
            v = v.repeat((n + _POOL - 1) // _POOL)[:n]
        t.copy_(v.view_as(t))

    with torch.no_grad():
        for name, m in model.named_modules():
            if name.startswith("detect.proj"):
                continue
            if isinstance(m, nn.BatchNorm2d):
                fill(m.weight, uniform, 0.4, 0.3)
                fill(m.bias, normal, 0.1)
                fill(m.running_mean, normal, 0.1)
                fill(m.running_var, uniform, 1.0, 0.5)
                m.num_batches_tracked.zero_()
            elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                w = m.weight
                fan_in = w.shape[0] if isinstance(m, nn.ConvTranspose2d) else w.shape[1] * w.shape[2] * w.shape[3]
                fill(w, normal, fan_in ** -0.5)
                if m.bias is not None:
                    fill(m.bias, normal, 0.1)
            alpha = m._parameters.get("alpha")
            if isinstance(alpha, torch.Tensor):
                u = torch.rand(2, generator=g).tolist()
                alpha.fill_(float(np.float16(1.0 + (1 if u[0] < 0.5 else -1) * (0.15 + 0.2 * u[1]))))
    return model.eval()


def _build_large(name: str, num_classes: int, seed: int) -> nn.Module:
    """A LARGE model built on the meta device (no upstream init: the 140M-value models build in
    seconds), QA blocks swapped in where the config says, then allocated and filled by
    :func:`randomize_fast`; ``detect.stride`` / ``proj`` / ``proj_conv`` get their fixed values."""
    from yolov6.models.yolo import Model

    mode, levels = LARGE[name][2], LARGE[name][8]
    with torch.device("meta"):
        model = Model(_large_config(name), channels=3, num_classes=num_classes)
        if mode.startswith("qarepvgg"):
            to_qa(model, v2=mode == "qarepvggv2")
    for child in model.children():  # Model._apply predates the ``recurse`` argument of to_empty
        child.to_empty(device="cpu")
    det = model.detect
    det.stride = model.stride = torch.tensor([8.0, 16.0, 32.0, 64.0][:levels])
    det.grid = [torch.zeros(1)] * levels
    with torch.no_grad():
        det.proj.copy_(torch.arange(det.proj.numel(), dtype=torch.float32))
        det.proj_conv.weight.copy_(det.proj.view(det.proj_conv.weight.shape))
    randomize_fast(model, seed)
    with torch.no_grad():  # head inputs are small here: logits to std ~2 (soft DFL, spread scores)
        for conv in det.cls_preds:
            conv.weight.mul_(32.0)
        for conv in det.reg_preds:
            conv.weight.mul_(16.0)
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
        if isinstance(m, (RepVGGBlock, QARepVGGBlock)):
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


class SPPF(SimSPPF):
    pass


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
               (ConvModule, ConvBNReLU, ConvBNSiLU, SPPFModule, SimSPPF, SPPF, CSPSPPFModule, SimCSPSPPF)}


def _unbiased(conv, bn):
    """0.4.x ConvBNSiLU / ConvBNReLU basic blocks have no conv bias (LARGE §4.17.4): fold the
    0.3.x bias into the BN (running_mean' = running_mean - b; same function)."""
    if conv.bias is not None:
        with torch.no_grad():
            bn.running_mean.sub_(conv.bias)
        conv.bias = None
    return conv, bn


def to_v04(model: nn.Module) -> nn.Module:
    """Copy of a (0.3.0-code) model re-nested as 0.4.x pickles it: SimConv -> ConvBNReLU(ConvModule),
    Conv -> ConvBNSiLU(ConvModule), Conv_C3 -> ConvBNSiLU / ConvBNReLU (by its activation),
    ConvWrapper / SimConvWrapper -> ConvBNSiLU / ConvBNReLU without the conv bias (folded into the
    BN mean), SimSPPF / SPPF -> SimSPPF / SPPF(sppf=SPPFModule), SimCSPSPPF ->
    SimCSPSPPF(cspsppf=CSPSPPFModule), RepVGG / QA ``rbr_dense`` (and RepVGG ``rbr_1x1``) ->
    ConvModule. Same function; same tensors except the folded ConvWrapper biases."""
    common = import_yolov6().layers.common
    real = {n: getattr(common, n) for n in ("Conv", "SimConv", "SimSPPF", "SPPF", "SimCSPSPPF", "RepVGGBlock",
                                            "Conv_C3", "ConvWrapper", "SimConvWrapper")}

    def convert(m):
        t = type(m)
        if t is real["SimConv"]:
            return ConvBNReLU(ConvModule(m.conv, m.bn, m.act))
        if t in (real["Conv"], real["Conv_C3"]):
            wrap = ConvBNSiLU if isinstance(m.act, nn.SiLU) else ConvBNReLU
            return wrap(ConvModule(m.conv, m.bn, m.act))
        if t in (real["ConvWrapper"], real["SimConvWrapper"]):
            wrap = ConvBNSiLU if t is real["ConvWrapper"] else ConvBNReLU
            return wrap(ConvModule(*_unbiased(m.block.conv, m.block.bn), m.block.act))
        if t in (real["SimSPPF"], real["SPPF"]):
            wrap = SimSPPF if t is real["SimSPPF"] else SPPF
            return wrap(SPPFModule(convert(m.cv1), convert(m.cv2), m.m))
        if isinstance(m, QARepVGGBlock):
            m.rbr_dense = ConvModule(m.rbr_dense.conv, m.rbr_dense.bn)
            return m
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
    classes += sorted({type(mod) for mod in m.modules() if isinstance(mod, QARepVGGBlock)}, key=lambda c: c.__name__)
    with official_names(classes):
        torch.save(ckpt, path)


# ----------------------------------------------------------------------------- direct Flax mapping

def flax_path(torch_path: str) -> tuple[str, ...]:
    """cfws_jax.models.yolov6 naming: split on '.', a numeric component joined to the previous with '_'."""
    out: list[str] = []
    for part in torch_path.split("."):
        if part.isdigit() and out:
            out[-1] += "_" + part
        else:
            out.append(part)
    return tuple(out)


def to_flax_variables(model: nn.Module) -> dict:
    """Train-form Flax ``{"params", "batch_stats"}`` of a 0.3.x-naming torch model, by module type
    (test-local, independent of ``converters``): Conv2d ``weight`` OIHW -> ``kernel`` HWIO (+ ``bias``);
    ConvTranspose2d ``[I, O, 2, 2]`` -> ``[1, 1, I, 4*O]`` (channel ``(a*2 + b)*O + o``), bias tiled
    4x; BatchNorm2d -> ``scale``/``bias`` + ``mean``/``var``; BottleRep ``alpha`` -> ``alpha`` [1].
    ``detect.proj`` / ``detect.proj_conv`` are skipped. Values float32 NumPy."""
    params: dict = {}
    stats: dict = {}

    def put(tree, path, leaf, value):
        node = tree
        for p in path:
            node = node.setdefault(p, {})
        node[leaf] = np.ascontiguousarray(value.detach().float().numpy())

    for name, m in model.named_modules():
        if not name or name.startswith("detect.proj"):
            continue
        path = flax_path(name)
        if isinstance(m, nn.ConvTranspose2d):
            i, o = m.weight.shape[:2]
            put(params, path, "kernel", m.weight.permute(0, 2, 3, 1).reshape(1, 1, i, 4 * o))
            put(params, path, "bias", m.bias.repeat(4))
        elif isinstance(m, nn.Conv2d):
            put(params, path, "kernel", m.weight.permute(2, 3, 1, 0))
            if m.bias is not None:
                put(params, path, "bias", m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            put(params, path, "scale", m.weight)
            put(params, path, "bias", m.bias)
            put(stats, path, "mean", m.running_mean)
            put(stats, path, "var", m.running_var)
        alpha = m._parameters.get("alpha")
        if alpha is not None:
            put(params, path, "alpha", alpha)
    return {"params": params, "batch_stats": stats}


@functools.lru_cache(maxsize=None)
def fixed_image(hw: int = 128) -> np.ndarray:
    """A fixed NHWC ``[1, hw, hw, 3]`` image in [0, 1]: smooth gradients plus noise."""
    yy, xx = np.mgrid[0:hw, 0:hw] / hw
    rgb = np.stack([xx, yy, 0.5 + 0.5 * np.sin(6 * xx * yy)], -1)
    noise = np.random.RandomState(0).rand(hw, hw, 3)
    return (0.7 * rgb + 0.3 * noise)[None].astype(np.float32)

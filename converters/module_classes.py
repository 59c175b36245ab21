"""Allow-lists of pickled ``nn.Module`` classes for :func:`converters.torch_reader.read_state_dict`.

Pass one of these as ``module_classes=``: each exact dotted name becomes an inert
:class:`converters.torch_reader.PickledObject` record (no constructor or ``__setstate__`` of the
real class runs); :func:`converters.containers.module_state_dict` walks only such records. Any
other class in the file is still refused by name.
"""

from __future__ import annotations

TORCH_NN_MODULE_CLASSES: frozenset[str] = frozenset(
    "torch.nn.modules." + name for name in (
        "container.Sequential", "container.ModuleList", "container.ModuleDict",
        "conv.Conv2d", "conv.ConvTranspose2d",
        "batchnorm.BatchNorm2d", "batchnorm.SyncBatchNorm",
        "activation.ReLU", "activation.ReLU6", "activation.SiLU", "activation.LeakyReLU",
        "activation.Hardswish", "activation.Hardsigmoid", "activation.Sigmoid", "activation.GELU",
        "activation.Mish",
        "linear.Identity", "linear.Linear",
        "pooling.MaxPool2d", "pooling.AvgPool2d", "pooling.AdaptiveAvgPool2d",
        "upsampling.Upsample", "dropout.Dropout", "flatten.Flatten", "padding.ZeroPad2d",
    ))
"""``torch.nn`` layer and container classes under their real module paths."""

_YOLOV6_COMMON = (
    "RepVGGBlock", "RepBlock", "Transpose", "Conv", "SimConv", "SimSPPF", "SimCSPSPPF", "SPPF",
    "CSPSPPF", "BiFusion", "ConvModule", "ConvBNReLU", "ConvBNSiLU", "ConvBN", "ConvBNHS",
    "SPPFModule", "SimSPPFModule", "CSPSPPFModule", "SimCSPSPPFModule", "BottleRep", "BottleRep3",
    "BepC3", "MBLABlock", "QARepVGGBlock", "QARepVGGBlockV2", "RealVGGBlock", "LinearAddBlock",
    "DetectBackend", "ConvWrapper", "SimConvWrapper", "Lite_EffiBlockS1", "Lite_EffiBlockS2",
    "SEBlock", "DPBlock", "DarknetBlock", "CSPBlock", "Stem",
    "Conv_C3",  # BepC3's 1x1 convs in <= 0.3.x m / l / P6 files (FORMATS_YOLOV6_LARGE.md §4.17.3)
)

YOLOV6_MODULE_CLASSES: frozenset[str] = TORCH_NN_MODULE_CLASSES | frozenset(
    ["yolov6.models.yolo.Model", "yolov6.models.yolo_lite.Model",
     "yolov6.models.efficientrep.EfficientRep", "yolov6.models.efficientrep.EfficientRep6",
     "yolov6.models.efficientrep.CSPBepBackbone", "yolov6.models.efficientrep.CSPBepBackbone_P6",
     "yolov6.models.efficientrep.Lite_EffiBackbone",
     "yolov6.models.reppan.RepPANNeck", "yolov6.models.reppan.RepBiFPANNeck",
     "yolov6.models.reppan.RepPANNeck6", "yolov6.models.reppan.RepBiFPANNeck6",
     "yolov6.models.reppan.CSPRepPANNeck", "yolov6.models.reppan.CSPRepBiFPANNeck",
     "yolov6.models.reppan.CSPRepPANNeck_P6", "yolov6.models.reppan.CSPRepBiFPANNeck_P6",
     "yolov6.models.reppan.Lite_EffiNeck",
     "yolov6.models.effidehead.Detect", "yolov6.models.heads.effidehead_distill_ns.Detect",
     "yolov6.models.heads.effidehead_fuseab.Detect", "yolov6.models.heads.effidehead_lite.Detect"]
    + ["yolov6.layers.common." + n for n in _YOLOV6_COMMON])
"""Every class FORMATS.md §4.7 names for YOLOv6 tags 0.1.0 .. 0.4.x, plus :data:`TORCH_NN_MODULE_CLASSES`;
of the classes the m / l / P6 and ``*_qa`` releases pickle (FORMATS_YOLOV6_LARGE.md §4.17.3,
FORMATS_YOLOV6_QA.md §4.25) only ``Conv_C3`` was not already listed.
(NumPy scalars in ``results`` and ``set`` need no entry: they are always allowed.)"""

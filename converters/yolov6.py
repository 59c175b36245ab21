"""YOLOv6 (meituan, tags 0.1.0 .. 0.4.x) PyTorch state dict -> Flax variables.

Written from FORMATS.md §4, FORMATS_YOLOV6_LARGE.md (§4.11-4.20) and FORMATS_YOLOV6_QA.md
(§4.21-4.28): facts only, no YOLOv6 code. Input: the flat state dict of a YOLOv6 ``Model`` (as
:func:`converters.torch_reader.read_state_dict` returns it for a release file read with
``module_classes=YOLOV6_MODULE_CLASSES``, or a plain ``state_dict``), train or deploy form, and,
for a pickled module tree, the class of every module (``StateDictSource.pickled_classes``).

``convert_yolov6(state_dict, arch=None, *, num_classes=None, pickled_classes=None) -> ConvertResult``:

1. 0.4.x keys are normalised to 0.2.x/0.3.x naming by the corrected rule of LARGE §4.17.4: the
   ``.sppf.`` / ``.cspsppf.`` infixes are dropped and ``.block.conv.`` / ``.block.bn.`` become
   ``.conv.`` / ``.bn.`` except in the basic blocks (``backbone.stem``, ``backbone.ERBlock_k.0``,
   a BottleRep's ``conv1`` / ``conv2``), whose ``block`` is kept (dialect ``yolov6-0.4``);
2. ``detect.proj``, ``detect.proj_conv.weight`` and training-only branches (``reg_preds_dist``,
   ``*_ab``; the 68-channel ``reg_preds`` of a distilled v3.0 n/s head, whose ``reg_preds_lrtb``
   becomes the box branch; a fuse_ab head's ``*_af`` become ``cls_preds`` / ``reg_preds``) are
   dropped and listed; an upstream-deploy QARepVGG block (``rbr_reparam`` + its BN_post ``bn``)
   has the BN folded into ``rbr_reparam`` (QA §4.24 step 5);
3. the fingerprint (:class:`Fingerprint`: form, basic block, head, P6, neck, CSP stages, stem
   width, ERBlock_3 depth, csp_e, SPPF kind, box channels) of the file is compared with the
   fingerprint of every registered YOLOv6 model's expected keys (same function, applied to the
   key table below); keys alone cannot tell a SiLU from a ReLU conv block (v2.0 ``l`` /
   ``l_base``) nor QARepVGG V1 from V2: the pickled class of ``backbone.stem`` (and any
   ``rbr_avg`` child) decides, else ``arch``; an ambiguous file without class names is refused
   naming the candidates and the ``--arch`` values. Deploy files of plain and QA models are the
   same function (QA §4.27): the plain name is taken unless the file shows QA blocks.
   ``arch`` may be a full name or a size alias (``yolov6m``) and must agree, else one ValueError
   names the key / shape that disagrees and what the keys do fit;
4. every expected key must be present with its shape (missing / unexpected / mis-shaped keys are
   listed, count + first few) -- except that a train-form file without any basic-block conv bias
   (0.4.x re-saves of l / l6, LARGE §4.20) gets those biases as 0 (listed in ``filled``);
5. values become float32 (fp16 releases; exact) in the Flax layout (:func:`key_table`).

The expected keys need no table per block: they are the Flax model's own variables
(``jax.eval_shape`` of ``init``, :func:`converters.common.flax_shapes`) under the generic leaf
rules of :mod:`converters.common`, with the module path rule below and one YOLOv6 rule: a
transposed conv ``upsample_transpose`` (torch ``[I, O, 2, 2]``) is a 1x1 kernel ``[1, 1, I, 4*O]``,
channel ``(a*2 + b)*O + o``, bias tiled 4x (:mod:`cfws_jax.models.yolov6.blocks`).

Flax module paths: the torch module path split on ``.``, a numeric component joined to the
previous one with ``_`` (``backbone.ERBlock_2.1.m.block.0`` -> ``backbone/ERBlock_2_1/m/block_0``).
Variables are ``{"params", "batch_stats"}`` (train) or ``{"params"}`` (deploy). Fusion is not done
here (``cfws_jax.models.fuse`` fuses train-form variables).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from fractions import Fraction
from typing import Any, Mapping, NamedTuple

import numpy as np
from flax import traverse_util

from cfws_jax.models import registry
from converters.common import LEAF_TO_TORCH, ConvertResult, flax_shapes, summary, to_flax, torch_shape

FAMILY = "yolov6"
FORMS = ("train", "deploy")


def configs() -> dict:
    """``{registry name: YOLOv6Config}`` of every registered YOLOv6 model."""
    return {n: registry.get_config(n) for n in registry.list_models() if registry.family(n) == FAMILY}


def is_yolov6_arch(arch: str | None) -> bool:
    """True for a yolov6 registry name or size alias (``yolov6s``)."""
    return isinstance(arch, str) and arch.startswith("yolov6")


def looks_like_yolov6(keys) -> bool:
    """True when the keys have YOLOv6's ``backbone.stem`` and a ``detect.`` head."""
    keys = list(keys)
    return any(k.startswith("backbone.stem.") for k in keys) and any(k.startswith("detect.") for k in keys)


# ----------------------------------------------------------------------------- key names

_BASIC_BLOCK = re.compile(r"(?:^backbone\.stem|^backbone\.ERBlock_\d+\.0|\.m\.(?:conv1|block\.\d+)\.conv[12])$")
"""Module paths of basic blocks, whose ``block`` child is kept by the 0.4.x normalisation."""


def _normalise_key(key: str) -> str:
    n = key.replace(".sppf.", ".").replace(".cspsppf.", ".")
    for part in (".block.conv.", ".block.bn."):
        i = n.find(part)
        if i >= 0 and not _BASIC_BLOCK.search(n[:i]):
            n = n[:i] + part[len(".block"):] + n[i + len(part):]
    return n


def normalise_keys(sd: Mapping[str, Any]) -> tuple[dict, bool]:
    """0.4.x -> 0.2.x/0.3.x names (LARGE §4.17.4, corrected rule); returns ``(state dict, was_0_4)``."""
    out, renamed = {}, False
    for k, v in sd.items():
        n = _normalise_key(k)
        renamed |= n != k
        if n in out:
            raise ValueError(f"keys {k!r} and another key both normalise to {n!r} (0.4.x -> 0.3.x naming)")
        out[n] = v
    return out, renamed


def flax_module_path(torch_path: str) -> tuple[str, ...]:
    """``"backbone.ERBlock_2.1.block.0.rbr_dense.conv"`` -> ``("backbone", "ERBlock_2_1", "block_0", ...)``."""
    out: list[str] = []
    for part in torch_path.split("."):
        if part.isdigit() and out:
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return tuple(out)


def torch_module_path(flax_path) -> str:
    """Inverse of :func:`flax_module_path` for YOLOv6 names: ``ERBlock_2_1`` -> ``ERBlock_2.1``,
    ``block_0`` -> ``block.0``, ``cls_preds_2`` -> ``cls_preds.2`` (one numeric suffix per component)."""
    parts = []
    for comp in flax_path:
        head, sep, tail = comp.rpartition("_")
        parts.append(f"{head}.{tail}" if sep and head and tail.isdigit() else comp)
    return ".".join(parts)


_TRAINING_ONLY = re.compile(r"^detect\.(proj|proj_conv\.weight|(reg_preds_dist|cls_preds_ab|reg_preds_ab)\..*)$")


def split_dropped(sd: Mapping[str, Any]) -> tuple[dict, list[str], bool]:
    """Remove ``detect.proj*`` and training-only head keys; returns ``(kept, dropped, distilled)``.

    A distilled v3.0 head (``detect.reg_preds_lrtb.*`` present): its ``detect.reg_preds.*`` (the
    training-only DFL branch) is dropped and ``reg_preds_lrtb.{i}`` is renamed ``reg_preds.{i}``.
    A fuse_ab head (LARGE §4.15): ``*_ab`` dropped, ``cls_preds_af`` / ``reg_preds_af`` renamed.
    """
    distilled = any(k.startswith("detect.reg_preds_lrtb.") for k in sd)
    kept, dropped = {}, []
    for k, v in sd.items():
        if _TRAINING_ONLY.match(k) or (distilled and k.startswith("detect.reg_preds.")):
            dropped.append(k)
        else:
            kept[k] = v
    renames = (("detect.reg_preds_lrtb.", "detect.reg_preds."),) if distilled else ()
    renames += (("detect.cls_preds_af.", "detect.cls_preds."), ("detect.reg_preds_af.", "detect.reg_preds."))
    for old, new in renames:
        kept = {k.replace(old, new, 1) if k.startswith(old) else k: v for k, v in kept.items()}
    return kept, dropped, distilled


def fold_qa_deploy_bn(sd: Mapping[str, Any]) -> tuple[dict, list[str]]:
    """Upstream-deploy QARepVGG blocks (``P.rbr_reparam`` + BN_post ``P.bn``, QA §4.24-4.25) ->
    plain deploy blocks (BN folded into ``rbr_reparam``, eps 1e-3); returns ``(state dict, prefixes)``."""
    from cfws_jax import fusion
    from cfws_jax.models.yolov6.blocks import BN_EPS

    prefixes = [k[:-len(".rbr_reparam.weight")] for k in sd
                if k.endswith(".rbr_reparam.weight") and k[:-len("rbr_reparam.weight")] + "bn.weight" in sd]
    if not prefixes:
        return dict(sd), []
    out = dict(sd)
    for p in prefixes:
        bn = [np.asarray(out.pop(f"{p}.bn.{leaf}"), np.float32) for leaf in ("weight", "bias", "running_mean",
                                                                           "running_var")]
        w = np.asarray(out[f"{p}.rbr_reparam.weight"], np.float32)
        b = np.asarray(out.get(f"{p}.rbr_reparam.bias", np.zeros(w.shape[0], np.float32)), np.float32)
        kernel, bias = fusion.fold_bn(w.transpose(2, 3, 1, 0), fusion.BN(*bn), BN_EPS, b)
        out[f"{p}.rbr_reparam.weight"] = np.asarray(kernel).transpose(3, 2, 0, 1)
        out[f"{p}.rbr_reparam.bias"] = np.asarray(bias)
    return out, prefixes


# ----------------------------------------------------------------------------- expected keys

class Leaf(NamedTuple):
    flax: tuple[str, ...]        # (collection, *module path, leaf)
    shape: tuple[int, ...]       # torch shape
    flax_shape: tuple[int, ...]
    layout: str                  # "conv" (OIHW -> HWIO), "tconv" ([I,O,2,2] -> [1,1,I,4O]), "tbias", "vec", "alpha"


@functools.lru_cache(maxsize=64)
def key_table(arch: str, form: str, num_classes: int | None = None) -> dict[str, Leaf]:
    """``{torch key (0.3.x naming, no dropped keys): Leaf}`` of registry model ``arch`` in ``form``,
    derived from the Flax model's variable shapes (no per-block table)."""
    table: dict[str, Leaf] = {}
    for path, shape in flax_shapes(arch, form == "deploy", num_classes).items():
        col, *mod, leaf = path
        key = f"{torch_module_path(mod)}.{LEAF_TO_TORCH[col, leaf]}"
        if mod[-1] == "upsample_transpose":  # ConvTranspose2d(k=2, s=2) as a 1x1 conv to 4*O channels
            tshape, layout = ((shape[2], shape[3] // 4, 2, 2), "tconv") if leaf == "kernel" else \
                ((shape[0] // 4,), "tbias")
        else:
            tshape = torch_shape(shape, leaf)
            layout = "alpha" if leaf == "alpha" else "conv" if len(shape) == 4 else "vec"
        table[key] = Leaf(path, tshape, shape, layout)
    return table


def leaf_to_flax(value, leaf: Leaf) -> np.ndarray:
    """A torch tensor (NumPy, any float dtype) -> float32 Flax layout (see :class:`Leaf`)."""
    from cfws_jax.models.yolov6.blocks import transpose_kernel_from_torch

    if leaf.layout == "tconv":
        return np.ascontiguousarray(transpose_kernel_from_torch(np.asarray(value, np.float32)))
    if leaf.layout == "tbias":
        return np.tile(np.asarray(value, np.float32), 4)
    return to_flax(value, leaf.flax_shape)


# ----------------------------------------------------------------------------- fingerprint

_BASIC_KEYS = {  # basic-block kind of the keys -> the stem key that shows it
    "repvgg": "backbone.stem.rbr_1x1.conv.weight",
    "qarepvgg": "backbone.stem.rbr_1x1.weight",
    "reparam": "backbone.stem.rbr_reparam.weight",
    "conv": "backbone.stem.block.conv.weight",
}
_BASIC_WHAT = {
    "repvgg": "RepVGG blocks", "qarepvgg": "QARepVGG blocks (bare 1x1, BN after the sum)",
    "reparam": "fused (deploy) RepVGG blocks", "conv": "conv + BN basic blocks (conv_silu / conv_relu)",
}


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """Facts of FORMATS.md §4.6 / LARGE §4.19 / QA §4.27 read from ``{torch key: shape}``."""

    form: str                     # "train" | "deploy"
    basic: str                    # a key of _BASIC_KEYS
    stem: tuple                   # (key, shape) of the stem conv weight
    head: str                     # "v1" (obj_preds) | "v2"
    p6: bool                      # backbone.ERBlock_6 / detect.stems.3
    bifpn: bool                   # neck.Bifusion0
    csp: bool                     # BepC3 stages (backbone.ERBlock_2.1.cv1)
    er3_blocks: int               # RepBlock elements / BottleReps of backbone.ERBlock_3.1
    csp_e: Fraction | None        # O(cv1) / O(cv3) of backbone.ERBlock_2.1
    cspsppf: bool                 # ERBlock_{5,6}.2.cv7
    box: tuple                    # (key, shape) of the level-0 box branch
    num_classes: int


def _shape(sd, key) -> tuple[int, ...]:
    return tuple(int(d) for d in np.shape(sd[key]))


def fingerprint(shapes: Mapping[str, tuple]) -> Fingerprint:
    """The :class:`Fingerprint` of a normalised ``{torch key: shape}`` (after :func:`split_dropped`)."""
    stems = [b for b, k in _BASIC_KEYS.items() if k in shapes]
    if "repvgg" in stems and "qarepvgg" in stems:
        stems.remove("qarepvgg")
    if len(stems) > 1:
        raise ValueError(f"checkpoint has {' and '.join(_BASIC_KEYS[b] for b in stems)}: mixed block kinds "
                         "or train / deploy forms")
    if not stems:
        raise ValueError("not a YOLOv6 EfficientRep checkpoint: none of backbone.stem.rbr_dense.conv.weight, "
                         "backbone.stem.rbr_reparam.weight, backbone.stem.block.conv.weight is present "
                         f"(first keys: {sorted(shapes)[:5]})")
    basic = stems[0]
    stem = {"conv": "backbone.stem.block.conv.weight", "reparam": "backbone.stem.rbr_reparam.weight"}.get(
        basic, "backbone.stem.rbr_dense.conv.weight")
    if stem not in shapes:
        raise ValueError(f"YOLOv6 stem key {stem} is missing")
    form = "deploy" if basic == "reparam" or (basic == "conv" and "backbone.stem.block.bn.weight" not in shapes) \
        else "train"
    box, cls = "detect.reg_preds.0.weight", "detect.cls_preds.0.weight"
    for key in (box, cls):
        if key not in shapes:
            raise ValueError(f"YOLOv6 head key {key} is missing")
    csp = any(k.startswith("backbone.ERBlock_2.1.cv1.") for k in shapes)
    group = r"^backbone\.ERBlock_3\.1\.m\.(conv1|block\.\d+)\." if csp else r"^backbone\.ERBlock_3\.1\.(conv1|block\.\d+)\."
    blocks = {m.group(1) for k in shapes for m in [re.match(group, k)] if m}
    cv1, cv3 = "backbone.ERBlock_2.1.cv1.conv.weight", "backbone.ERBlock_2.1.cv3.conv.weight"
    csp_e = Fraction(shapes[cv1][0], shapes[cv3][0]) if csp and cv1 in shapes and cv3 in shapes else None
    return Fingerprint(
        form, basic, (stem, tuple(shapes[stem])), "v1" if "detect.obj_preds.0.weight" in shapes else "v2",
        any(k.startswith(("backbone.ERBlock_6.", "detect.stems.3.")) for k in shapes),
        any(k.startswith("neck.Bifusion0.") for k in shapes), csp, len(blocks), csp_e,
        any(re.match(r"^backbone\.ERBlock_[56]\.2\.cv7\.", k) for k in shapes),
        (box, tuple(shapes[box])), int(shapes[cls][0]))


def model_fingerprint(arch: str, form: str, num_classes: int | None = None) -> Fingerprint:
    """The fingerprint of registry model ``arch``'s expected keys (:func:`key_table`)."""
    return fingerprint({k: leaf.shape for k, leaf in key_table(arch, form, num_classes).items()})


def _version(fp: Fingerprint) -> str:
    return "v1.0" if fp.head == "v1" else ("v3.0" if fp.bifpn else "v2.0")


def _box_kind(n: int) -> str:
    if n == 4:
        return "ltrb boxes"
    if n % 4 == 0:
        return f"DFL boxes, reg_max {n // 4 - 1}"
    return "not 4 (ltrb) nor 4 * (reg_max + 1) (DFL)"


def disagreement(fp: Fingerprint, name: str, want: Fingerprint) -> str | None:
    """Why the checkpoint (``fp``) is not ``name`` (``want``): the first disagreeing key / shape, or None."""
    have = lambda b: "have" if b else "have no"  # noqa: E731
    if fp.head != want.head:
        return (f"the keys {have(fp.head == 'v1')} detect.obj_preds.* "
                f"({'v1.0 objectness head' if fp.head == 'v1' else 'no objectness: v2.0+ head'}), "
                f"{name} is {_version(want)}")
    if fp.p6 != want.p6:
        return (f"the keys {have(fp.p6)} backbone.ERBlock_6.* / detect.stems.3.* "
                f"({'P6: four output levels' if fp.p6 else 'P5: three output levels'}), {name} is a "
                f"{'P6 model (four levels, strides 8-64)' if want.p6 else 'P5 model (three levels)'}")
    if fp.bifpn != want.bifpn:
        return (f"the keys {have(fp.bifpn)} neck.Bifusion0.* "
                f"({'v3.0 BiFusion neck' if fp.bifpn else 'RepPAN neck: v1.0 / v2.0'}), {name} is {_version(want)}")
    if fp.basic != want.basic:
        return (f"the keys have {_BASIC_KEYS[fp.basic]} ({_BASIC_WHAT[fp.basic]}), {name} expects "
                f"{_BASIC_KEYS[want.basic]} ({_BASIC_WHAT[want.basic]})")
    if fp.csp != want.csp:
        return (f"the keys {have(fp.csp)} backbone.ERBlock_2.1.cv1.* "
                f"({'BepC3 stages' if fp.csp else 'RepBlock stages'}), {name} has "
                f"{'BepC3 stages' if want.csp else 'RepBlock stages'}")
    key, shape = fp.stem
    if shape[0] != want.stem[1][0]:
        return f"{key} has shape {shape} (stem width {shape[0]}), {name} expects {want.stem[1]}"
    if fp.er3_blocks != want.er3_blocks:
        unit = "BottleReps (m.conv1 + m.block.*)" if fp.csp else "RepVGG blocks (conv1 + block.*)"
        return f"backbone.ERBlock_3.1 has {fp.er3_blocks} {unit}, {name} has {want.er3_blocks}"
    if fp.csp_e != want.csp_e:
        return (f"backbone.ERBlock_2.1.cv1 / cv3 outputs give csp_e {fp.csp_e}, {name} has csp_e {want.csp_e}")
    if fp.cspsppf != want.cspsppf:
        return (f"the keys {have(fp.cspsppf)} an SPPF block cv7 (SimCSPSPPF), {name} has "
                f"{'SimCSPSPPF' if want.cspsppf else 'an SPPF-type block (cv1, cv2)'}")
    key, shape = fp.box
    if shape[0] != want.box[1][0]:
        return (f"{key} has shape {shape} ({_box_kind(shape[0])}), {name} expects {want.box[1][0]} box "
                f"channels ({_box_kind(want.box[1][0])})")
    return None


def describe(fp: Fingerprint) -> str:
    return (f"{fp.form} form, {_BASIC_WHAT[fp.basic]}, {'P6' if fp.p6 else 'P5'}, head {fp.head}, "
            f"{'BiFusion' if fp.bifpn else 'RepPAN'} neck, {'BepC3' if fp.csp else 'RepBlock'} stages, "
            f"{fp.stem[0]} {fp.stem[1]}, {fp.er3_blocks} units in backbone.ERBlock_3.1, "
            f"{fp.box[0]} {fp.box[1]}, nc {fp.num_classes}")


# ----------------------------------------------------------------------------- choosing the model

_CLASS_BLOCK = {"RepVGGBlock": "repvgg", "QARepVGGBlock": "qarepvgg", "QARepVGGBlockV2": "qarepvggv2",
                "ConvWrapper": "conv_silu", "ConvBNSiLU": "conv_silu",
                "SimConvWrapper": "conv_relu", "ConvBNReLU": "conv_relu"}
_QA_BLOCKS = frozenset({"qarepvgg", "qarepvggv2"})
_PREFERENCE = ("repvgg", "qarepvgg", "qarepvggv2", "conv_silu", "conv_relu")


class BlockEvidence(NamedTuple):
    blocks: frozenset   # the basic-block kinds (YOLOv6Config.block) the file allows
    why: str            # what shows it


def block_evidence(pickled_classes: Mapping[str, str] | None, qa_keys: bool) -> BlockEvidence | None:
    """Basic-block kinds allowed by the pickled class of ``backbone.stem`` (an ``rbr_avg`` child
    anywhere means the V2 average branch, trusted over the class name, QA §4.27) or, without
    class names, by QA-only keys; None when nothing tells."""
    cls = (pickled_classes or {}).get("backbone.stem")
    block = _CLASS_BLOCK.get(cls.rsplit(".", 1)[-1]) if cls else None
    if block is not None:
        if block in _QA_BLOCKS:
            avg = [p for p in pickled_classes if p.endswith(".rbr_avg")]
            block = "qarepvggv2" if avg else "qarepvgg"
            cls += f" ({'with' if avg else 'without'} rbr_avg average branches)"
        return BlockEvidence(frozenset({block}), f"backbone.stem is a pickled {cls} (block {block})")
    if qa_keys:
        return BlockEvidence(_QA_BLOCKS, "the keys show QARepVGG blocks")
    return None


def _same_function(names, cfgs, form: str) -> bool:
    """Deploy forms of configs equal up to plain / QA RepVGG blocks (all fused to ``rbr_reparam``)."""
    if form != "deploy":
        return False
    rep = {"repvgg", "qarepvgg", "qarepvggv2"}
    norm = {dataclasses.replace(cfgs[n], block="repvgg") if cfgs[n].block in rep else cfgs[n] for n in names}
    return len(norm) == 1


def _model_nc(cfg, nc: int) -> int | None:
    return None if nc == cfg.num_classes else nc


def _table_fits(name: str, cfg, fp: Fingerprint, shapes: Mapping[str, tuple]) -> bool:
    table = key_table(name, fp.form, _model_nc(cfg, fp.num_classes))
    missing = set(table) - set(shapes)
    return (missing <= set(_absent_biases(table, shapes, fp.form)) and set(shapes) <= set(table)
            and all(tuple(shapes[k]) == table[k].shape for k in shapes))


def _narrow(names: list[str], cfgs, fp: Fingerprint, shapes, evidence: BlockEvidence | None) -> list[str]:
    """Candidates with identical fingerprints -> the ones the exact keys, the block evidence and
    (deploy files of the same function) the plain-before-QA preference leave."""
    if len(names) > 1:
        exact = [n for n in names if _table_fits(n, cfgs[n], fp, shapes)]
        names = exact or names
    if evidence is not None:
        told = [n for n in names if cfgs[n].block in evidence.blocks]
        if not told:
            blocks = ", ".join(f"{n} ({cfgs[n].block})" for n in names)
            raise ValueError(f"{evidence.why}, but the keys and shapes fit only {blocks}")
        names = told
    if len(names) > 1 and _same_function(names, cfgs, fp.form):
        names = [min(names, key=lambda n: _PREFERENCE.index(cfgs[n].block))]
    return names


def _ambiguous(names: list[str], cfgs) -> str:
    blocks = sorted({cfgs[n].block for n in names})
    why = ("they differ only in the activations / QARepVGG branches, which the keys do not record"
           if len(blocks) > 1 else "identical keys and shapes")
    return (f"ambiguous YOLOv6 checkpoint: {', '.join(names)} all fit ({why}; a release file's pickled "
            f"classes would tell, this file has none); pass {' or '.join('--arch ' + n for n in names)}")


def _prefilter(fp: Fingerprint, cfgs, strict: bool = True) -> list[str]:
    """Names whose config agrees with the file on stem width (``channels_list[0]``) and, ``strict``,
    on head, P6, neck and CSP stages (cheap: no model is built; the fingerprint of each name's
    expected keys still decides)."""
    def agrees(c):
        if c.channels_list[0] != fp.stem[1][0]:
            return False
        return not strict or ((c.head == "v1") == (fp.head == "v1") and bool(getattr(c, "p6", False)) == fp.p6
                              and bool(c.bifpn) == fp.bifpn and (getattr(c, "csp_e", None) is not None) == fp.csp)

    return [n for n, c in cfgs.items() if agrees(c)]


def resolve_arch(fp: Fingerprint, hint: str | None, cfgs: Mapping[str, Any], shapes: Mapping[str, tuple],
                 evidence: BlockEvidence | None = None) -> str:
    """The registry name the checkpoint fits, checked against the ``--arch`` hint and the block evidence."""
    def want(n):
        return model_fingerprint(n, fp.form, _model_nc(cfgs[n], fp.num_classes))

    fits = [n for n in _prefilter(fp, cfgs) if disagreement(fp, n, want(n)) is None]
    if hint is None:
        names = _narrow(fits, cfgs, fp, shapes, evidence)
        if len(names) == 1:
            return names[0]
        if names:
            raise ValueError(_ambiguous(names, cfgs))
        raise ValueError(_no_fit(fp, cfgs, want))
    if hint in cfgs:
        cands = [hint]
    else:
        cands = sorted(n for n in cfgs if n.startswith(hint + "_v"))
        if not cands:
            raise ValueError(f"unknown YOLOv6 architecture {hint!r}; known: {', '.join(sorted(cfgs))} "
                             "or a size alias (yolov6n, yolov6t, yolov6s, yolov6m, yolov6l)")
    ok = [n for n in cands if n in fits]
    if ok:
        names = _narrow(ok, cfgs, fp, shapes, evidence)
        if len(names) == 1:
            return names[0]
        raise ValueError(f"--arch {hint}: {', '.join(names)} all fit; pass the full name")
    # Explain with the candidate of the same version when there is one.
    same = [n for n in cands if (want(n).head, want(n).bifpn, want(n).p6) == (fp.head, fp.bifpn, fp.p6)]
    name = (same or cands)[0]
    why = disagreement(fp, name, want(name))
    if not same and len(cands) > 1:
        why += f" (no {hint} of that version exists: {hint} is one of {', '.join(cands)})"
    try:
        names = _narrow(fits, cfgs, fp, shapes, evidence)
    except ValueError:
        names = fits
    fit = (f"the keys and shapes fit {names[0]}" if len(names) == 1 else
           f"the keys and shapes fit {', '.join(names)}" if names else f"no known architecture fits them ({describe(fp)})")
    raise ValueError(f"--arch {hint} disagrees with the checkpoint: {why}; {fit}")


def _no_fit(fp: Fingerprint, cfgs, want) -> str:
    """No model fits: name the closest model(s) of the file's stem width and the one difference."""
    near = []
    for n in _prefilter(fp, cfgs, strict=False):
        w = want(n)
        diffs = sum(getattr(fp, f) != getattr(w, f) for f in ("head", "p6", "bifpn", "basic", "csp", "er3_blocks",
                                                             "csp_e", "cspsppf")) + (fp.box[1][0] != w.box[1][0])
        if diffs == 1:
            near.append(f"closest {n}, but {disagreement(fp, n, w)}")
    tail = "; ".join(near) if near else f"known: {', '.join(sorted(cfgs))}"
    return f"no YOLOv6 architecture fits the checkpoint ({describe(fp)}); {tail}"


# ----------------------------------------------------------------------------- conversion

def _absent_biases(table: Mapping[str, Leaf], shapes, form: str) -> list[str]:
    """The basic-block conv biases to fill with 0: in a train-form file that has **none** of them
    (0.4.x ConvBNSiLU / ConvBNReLU are built without bias, LARGE §4.17.4 / §4.20)."""
    if form != "train":
        return []
    keys = sorted(k for k in table if k.endswith(".block.conv.bias") and _BASIC_BLOCK.search(k[:-len(".block.conv.bias")]))
    return keys if keys and not any(k in shapes for k in keys) else []


def _mismatch(key: str, got: tuple, want: tuple) -> str:
    note = ""
    if re.match(r"^detect\.reg_preds\.\d+\.", key):
        note = f", box channels {got[0]}: {_box_kind(got[0])}; the model has {want[0]}: {_box_kind(want[0])}"
    elif key.endswith(".alpha"):
        note = ", BottleRep alpha is one learned scalar"
    return f"{key} {got} (expected {want}{note})"


class Identified(NamedTuple):
    """What :func:`identify_yolov6` found: the model and how the file's keys map to it."""
    arch: str
    form: str
    state_dict: dict             # normalised keys, dropped keys removed, QA deploy BN folded
    table: dict                  # {torch key: Leaf} of ``arch`` in ``form``
    num_classes: int | None      # for create_model: None when the architecture's default
    dialect: str                 # "yolov6" | "yolov6-0.4"
    dropped: tuple[str, ...]
    filled: tuple[str, ...]      # absent 0.4.x basic-block conv biases (set to 0)


def identify_yolov6(state_dict: Mapping[str, Any], arch: str | None = None, *, num_classes: int | None = None,
                    pickled_classes: Mapping[str, str] | None = None) -> Identified:
    """Steps 1-4 of the module docstring: which model the state dict is, every key checked
    (shapes only: ``state_dict`` values may be any array-likes with a ``shape``)."""
    sd = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    sd, was_04 = normalise_keys(sd)
    sd, dropped, _ = split_dropped(sd)
    sd, qa_folded = fold_qa_deploy_bn(sd)
    shapes = {k: _shape(sd, k) for k in sd}
    fp = fingerprint(shapes)
    cfgs = configs()
    evidence = block_evidence(pickled_classes, bool(qa_folded) or fp.basic == "qarepvgg")
    arch = resolve_arch(fp, arch, cfgs, shapes, evidence)
    nc = fp.num_classes
    if num_classes is not None and num_classes != nc:
        raise ValueError(f"--num-classes {num_classes} disagrees with detect.cls_preds.0.weight "
                         f"{shapes['detect.cls_preds.0.weight']} ({nc} classes)")
    model_nc = _model_nc(cfgs[arch], nc)
    table = key_table(arch, fp.form, model_nc)
    filled = _absent_biases(table, shapes, fp.form)
    missing = sorted(set(table) - set(sd) - set(filled))
    unexpected = sorted(set(sd) - set(table))
    mismatched = [_mismatch(k, shapes[k], table[k].shape) for k in sorted(set(table) & set(sd))
                  if shapes[k] != table[k].shape]
    if missing or unexpected or mismatched:
        parts = [f"state dict does not fit {arch} ({fp.form} form{', 0.4.x keys normalised' if was_04 else ''})"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", mismatched)):
            if items:
                parts.append(f"{title} {summary(items)}")
        raise ValueError("; ".join(parts))
    return Identified(arch, fp.form, sd, table, model_nc, "yolov6-0.4" if was_04 or filled else "yolov6",
                      tuple(dropped), tuple(filled))


def convert_yolov6(state_dict: Mapping[str, Any], arch: str | None = None, *, num_classes: int | None = None,
                   pickled_classes: Mapping[str, str] | None = None) -> ConvertResult:
    """YOLOv6 state dict -> :class:`~converters.common.ConvertResult` (see the module docstring)."""
    idf = identify_yolov6(state_dict, arch, num_classes=num_classes, pickled_classes=pickled_classes)
    flat = {leaf.flax: (np.zeros(leaf.flax_shape, np.float32) if k in idf.filled else leaf_to_flax(idf.state_dict[k], leaf))
            for k, leaf in idf.table.items()}
    return ConvertResult(idf.arch, idf.form, idf.dialect, traverse_util.unflatten_dict(flat), idf.num_classes,
                         idf.dropped, idf.filled)

"""YOLOv6 (meituan, tags 0.1.0 .. 0.4.x) PyTorch state dict -> Flax variables.

Written from FORMATS.md §4 (facts only; no YOLOv6 code). Input: the flat state dict of a YOLOv6
``Model`` (as :func:`converters.torch_reader.read_state_dict` returns it for a release file read
with ``module_classes=YOLOV6_MODULE_CLASSES``, or a plain ``state_dict``), train or deploy form.

``convert_yolov6(state_dict, arch=None, *, num_classes=None) -> ConvertResult``:

1. 0.4.x keys are normalised to 0.2.x/0.3.x naming (§4.6): ``.block.conv.``/``.block.bn.`` ->
   ``.conv.``/``.bn.``, the ``.sppf.``/``.cspsppf.`` infixes dropped (dialect ``yolov6-0.4``, else
   ``yolov6``);
2. ``detect.proj``, ``detect.proj_conv.weight`` and training-only branches (``reg_preds_dist``,
   ``cls_preds_ab``, ``reg_preds_ab``; the 68-channel ``reg_preds`` of a distilled v3.0 head when
   ``reg_preds_lrtb`` exists, which then becomes the box branch) are dropped and listed;
3. the fingerprint (form, head v1/v2, BiFusion neck, stem width, ERBlock_3 depth, box channels,
   ``nc``) picks the registry name (``yolov6s_v2`` ...); ``arch`` may be a full name or a size
   alias (``yolov6s``) and must agree, else one ValueError names the key / shape that disagrees
   and what the keys do fit;
4. every expected key (Appendix A, built from the config's scaled channels and repeats) must be
   present with its shape; missing / unexpected / mis-shaped keys are listed (count + first few);
5. values become float32 (fp16 releases; exact); conv ``weight`` OIHW -> ``kernel`` HWIO; BN
   ``weight``/``bias`` -> params ``scale``/``bias``, ``running_mean``/``running_var`` ->
   batch_stats ``mean``/``var``; ConvTranspose2d ``[I, O, 2, 2]`` -> 1x1 kernel ``[1, 1, I, 4*O]``
   with channel ``(a*2 + b)*O + o`` and bias tiled 4x (see :mod:`cfws_jax.models.yolov6`).

Flax module paths: the torch module path split on ``.``, a numeric component joined to the
previous one with ``_`` (``backbone.ERBlock_2.1.block.0`` -> ``backbone/ERBlock_2_1/block_0``).
Variables are ``{"params", "batch_stats"}`` (train) or ``{"params"}`` (deploy). Fusion is not done
here (``cfws_jax.models.fuse`` fuses train-form variables in float64).
"""

from __future__ import annotations

import re
from typing import Any, Mapping, NamedTuple

import numpy as np
from flax import traverse_util

FAMILY = "yolov6"
FORMS = ("train", "deploy")
_SHOW = 5  # items shown per summarised list

_BN = {"weight": ("params", "scale"), "bias": ("params", "bias"),
       "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}


def configs() -> dict:
    """``{registry name: YOLOv6Config}`` of the Flax models (cfws_jax.models.yolov6.config)."""
    from cfws_jax.models.yolov6.config import YOLOV6_CONFIGS

    return dict(YOLOV6_CONFIGS)


def is_yolov6_arch(arch: str | None) -> bool:
    """True for a yolov6 registry name or size alias (``yolov6s``)."""
    return isinstance(arch, str) and arch.startswith("yolov6")


def looks_like_yolov6(keys) -> bool:
    """True when the keys have YOLOv6's ``backbone.stem`` RepVGG block and a ``detect.`` head."""
    keys = list(keys)
    return (any(k.startswith("backbone.stem.rbr_") for k in keys)
            and any(k.startswith("detect.") for k in keys))


# ----------------------------------------------------------------------------- key names

def _summary(items, n: int = _SHOW) -> str:
    items = list(items)
    return f"{len(items)} ({', '.join(items[:n])}{', ...' if len(items) > n else ''})"


def normalise_keys(sd: Mapping[str, Any]) -> tuple[dict, bool]:
    """0.4.x -> 0.2.x/0.3.x names (FORMATS.md §4.6); returns ``(state dict, was_0_4)``."""
    out, renamed = {}, False
    for k, v in sd.items():
        n = k.replace(".block.conv.", ".conv.").replace(".block.bn.", ".bn.")
        n = n.replace(".sppf.", ".").replace(".cspsppf.", ".")
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


_TRAINING_ONLY = re.compile(r"^detect\.(proj|proj_conv\.weight|(reg_preds_dist|cls_preds_ab|reg_preds_ab)\..*)$")


def split_dropped(sd: Mapping[str, Any]) -> tuple[dict, list[str], bool]:
    """Remove ``detect.proj*`` and training-only head keys; returns ``(kept, dropped, distilled)``.

    A distilled v3.0 head (``detect.reg_preds_lrtb.*`` present): its ``detect.reg_preds.*`` (the
    training-only DFL branch) is dropped and ``reg_preds_lrtb.{i}`` is renamed ``reg_preds.{i}``.
    """
    distilled = any(k.startswith("detect.reg_preds_lrtb.") for k in sd)
    kept, dropped = {}, []
    for k, v in sd.items():
        if _TRAINING_ONLY.match(k) or (distilled and k.startswith("detect.reg_preds.")):
            dropped.append(k)
        else:
            kept[k] = v
    if distilled:
        kept = {k.replace("detect.reg_preds_lrtb.", "detect.reg_preds.", 1): v for k, v in kept.items()}
    return kept, sorted(dropped), distilled


# ----------------------------------------------------------------------------- layout (Appendix A)

class Module(NamedTuple):
    """One torch module of the layout: kind ``rep`` (RepVGGBlock), ``convbn``, ``tconv`` or ``pred``."""
    path: str
    kind: str
    cout: int
    cin: int
    k: int = 1
    identity: bool = False


def _rep(path, cin, cout, stride=1):
    return Module(path, "rep", cout, cin, 3, identity=cin == cout and stride == 1)


def _repblock(path, cin, cout, n):
    mods = [_rep(f"{path}.conv1", cin, cout)]
    mods += [_rep(f"{path}.block.{j}", cout, cout) for j in range(n - 1)]
    return mods


def modules(cfg, num_classes: int) -> list[Module]:
    """Train-time torch modules of a ``YOLOv6Config`` (FORMATS.md §4.2-4.4, Appendix A)."""
    c, r = cfg.channels_list, cfg.num_repeat
    mods = [_rep("backbone.stem", 3, c[0], stride=2)]
    for k in range(2, 6):
        mods.append(_rep(f"backbone.ERBlock_{k}.0", c[k - 2], c[k - 1], stride=2))
        mods += _repblock(f"backbone.ERBlock_{k}.1", c[k - 1], c[k - 1], r[k - 1])
    sp, c4 = "backbone.ERBlock_5.2", c[4]
    if cfg.cspsppf:
        h = c4 // 2
        mods += [Module(f"{sp}.cv1", "convbn", h, c4), Module(f"{sp}.cv2", "convbn", h, c4),
                 Module(f"{sp}.cv3", "convbn", h, h, 3), Module(f"{sp}.cv4", "convbn", h, h),
                 Module(f"{sp}.cv5", "convbn", h, 4 * h), Module(f"{sp}.cv6", "convbn", h, h, 3),
                 Module(f"{sp}.cv7", "convbn", c4, 2 * h)]
    else:
        mods += [Module(f"{sp}.cv1", "convbn", c4 // 2, c4), Module(f"{sp}.cv2", "convbn", c4, 2 * c4)]
    mods.append(Module("neck.reduce_layer0", "convbn", c[5], c[4]))
    if cfg.bifpn:
        for i, (out, x1, x2) in enumerate(((c[5], c[3], c[2]), (c[6], c[2], c[1]))):
            b = f"neck.Bifusion{i}"
            mods += [Module(f"{b}.cv1", "convbn", out, x1), Module(f"{b}.cv2", "convbn", out, x2),
                     Module(f"{b}.cv3", "convbn", out, 3 * out),
                     Module(f"{b}.upsample.upsample_transpose", "tconv", out, out, 2),
                     Module(f"{b}.downsample", "convbn", out, out, 3)]
            if i == 0:
                mods += _repblock("neck.Rep_p4", c[5], c[5], r[5])
                mods.append(Module("neck.reduce_layer1", "convbn", c[6], c[5]))
            else:
                mods += _repblock("neck.Rep_p3", c[6], c[6], r[6])
    else:
        mods.append(Module("neck.upsample0.upsample_transpose", "tconv", c[5], c[5], 2))
        mods += _repblock("neck.Rep_p4", c[3] + c[5], c[5], r[5])
        mods.append(Module("neck.reduce_layer1", "convbn", c[6], c[5]))
        mods.append(Module("neck.upsample1.upsample_transpose", "tconv", c[6], c[6], 2))
        mods += _repblock("neck.Rep_p3", c[2] + c[6], c[6], r[6])
    mods.append(Module("neck.downsample2", "convbn", c[7], c[6], 3))
    mods += _repblock("neck.Rep_n3", c[6] + c[7], c[8], r[7])
    mods.append(Module("neck.downsample1", "convbn", c[9], c[8], 3))
    mods += _repblock("neck.Rep_n4", c[5] + c[9], c[10], r[8])
    for i, ch in enumerate((c[6], c[8], c[10])):
        mods += [Module(f"detect.stems.{i}", "convbn", ch, ch), Module(f"detect.cls_convs.{i}", "convbn", ch, ch, 3),
                 Module(f"detect.reg_convs.{i}", "convbn", ch, ch, 3),
                 Module(f"detect.cls_preds.{i}", "pred", num_classes, ch),
                 Module(f"detect.reg_preds.{i}", "pred", cfg.reg_channels, ch)]
        if cfg.head == "v1":
            mods.append(Module(f"detect.obj_preds.{i}", "pred", 1, ch))
    return mods


class _Leaf(NamedTuple):
    flax: tuple[str, ...]   # (collection, *module path, leaf)
    shape: tuple[int, ...]  # torch shape
    layout: str             # "conv" (OIHW -> HWIO), "tconv" ([I,O,2,2] -> [1,1,I,4O]), "tbias", "vec"


def key_table(cfg, form: str, num_classes: int) -> dict[str, _Leaf]:
    """``{torch key (0.3.x naming, no dropped keys): _Leaf}`` for ``cfg`` in ``form``."""
    table: dict[str, _Leaf] = {}

    def conv(tpath, fpath, o, i, k, bias):
        table[f"{tpath}.weight"] = _Leaf(("params", *fpath, "kernel"), (o, i, k, k), "conv")
        if bias:
            table[f"{tpath}.bias"] = _Leaf(("params", *fpath, "bias"), (o,), "vec")

    def bn(tpath, fpath, o):
        for leaf, (col, name) in _BN.items():
            table[f"{tpath}.{leaf}"] = _Leaf((col, *fpath, name), (o,), "vec")

    for m in modules(cfg, num_classes):
        f = flax_module_path(m.path)
        p = m.path
        if m.kind == "rep" and form == "train":
            conv(f"{p}.rbr_dense.conv", (*f, "rbr_dense", "conv"), m.cout, m.cin, 3, False)
            bn(f"{p}.rbr_dense.bn", (*f, "rbr_dense", "bn"), m.cout)
            conv(f"{p}.rbr_1x1.conv", (*f, "rbr_1x1", "conv"), m.cout, m.cin, 1, False)
            bn(f"{p}.rbr_1x1.bn", (*f, "rbr_1x1", "bn"), m.cout)
            if m.identity:
                bn(f"{p}.rbr_identity", (*f, "rbr_identity"), m.cout)
        elif m.kind == "rep":
            conv(f"{p}.rbr_reparam", (*f, "rbr_reparam"), m.cout, m.cin, 3, True)
        elif m.kind == "convbn" and form == "train":
            conv(f"{p}.conv", (*f, "conv"), m.cout, m.cin, m.k, False)
            bn(f"{p}.bn", (*f, "bn"), m.cout)
        elif m.kind == "convbn":
            conv(f"{p}.conv", (*f, "conv"), m.cout, m.cin, m.k, True)
        elif m.kind == "tconv":
            table[f"{p}.weight"] = _Leaf(("params", *f, "kernel"), (m.cin, m.cout, 2, 2), "tconv")
            table[f"{p}.bias"] = _Leaf(("params", *f, "bias"), (m.cout,), "tbias")
        else:  # pred
            conv(p, f, m.cout, m.cin, 1, True)
    return table


def to_flax(value, layout: str) -> np.ndarray:
    """A torch tensor (NumPy, any float dtype) -> float32 Flax layout (see :class:`_Leaf`)."""
    v = np.asarray(value, np.float32)
    if layout == "conv":
        return np.ascontiguousarray(v.transpose(2, 3, 1, 0))
    if layout == "tconv":  # w[i, o, a, b] -> kernel[0, 0, i, (a*2 + b)*O + o]
        i, o = v.shape[:2]
        return np.ascontiguousarray(v.transpose(0, 2, 3, 1).reshape(1, 1, i, 4 * o))
    if layout == "tbias":
        return np.tile(v, 4)
    return np.ascontiguousarray(v)


# ----------------------------------------------------------------------------- fingerprint

class Fingerprint(NamedTuple):
    form: str
    head: str             # "v1" (obj_preds) | "v2"
    bifpn: bool           # neck.Bifusion0.* present (v3.0)
    stem: tuple           # (key, shape)
    er3_blocks: int       # RepVGG blocks in backbone.ERBlock_3.1 (conv1 + block.*)
    box: tuple            # (key, shape) of the level-0 box branch (after the distilled rename)
    num_classes: int
    distilled: bool


def _shape(sd, key):
    return tuple(int(d) for d in np.shape(sd[key]))


def fingerprint(sd: Mapping[str, Any], distilled: bool) -> Fingerprint:
    """Facts of FORMATS.md §4.6 from a normalised state dict (after :func:`split_dropped`)."""
    train, deploy = "backbone.stem.rbr_dense.conv.weight", "backbone.stem.rbr_reparam.weight"
    if train in sd and deploy in sd:
        raise ValueError(f"checkpoint has both {train} and {deploy}: mixed train / deploy form")
    if train not in sd and deploy not in sd:
        raise ValueError(f"not a YOLOv6 EfficientRep checkpoint: neither {train} nor {deploy} is present "
                         f"(first keys: {sorted(sd)[:5]})")
    form = "train" if train in sd else "deploy"
    stem = train if form == "train" else deploy
    if any(k.startswith("backbone.ERBlock_2.1.cv1.") or (k.startswith("backbone.ERBlock_") and ".m." in k)
           for k in sd):
        raise ValueError("CSPBep backbone (backbone.ERBlock_2.1.cv1 / .m. keys: YOLOv6 m / l) is not supported")
    if any(k.startswith("detect.stems.3.") for k in sd):
        raise ValueError("4-level (P6) head (detect.stems.3.* keys) is not supported")
    if any(k.endswith("rbr_1x1.weight") for k in sd):
        raise ValueError("QARepVGG blocks (4-D rbr_1x1.weight) are not supported")
    blocks = {m.group(1) for k in sd for m in [re.match(r"^backbone\.ERBlock_3\.1\.(conv1|block\.\d+)\.", k)] if m}
    box = "detect.reg_preds.0.weight"
    cls = "detect.cls_preds.0.weight"
    for key in (box, cls):
        if key not in sd:
            raise ValueError(f"YOLOv6 head key {key} is missing")
    src_box = "detect.reg_preds_lrtb.0.weight" if distilled else box
    return Fingerprint(form, "v1" if "detect.obj_preds.0.weight" in sd else "v2",
                       any(k.startswith("neck.Bifusion0.") for k in sd), (stem, _shape(sd, stem)),
                       len(blocks), (src_box, _shape(sd, box)), _shape(sd, cls)[0], distilled)


def _version(cfg) -> str:
    return "v1.0" if cfg.head == "v1" else ("v3.0" if cfg.bifpn else "v2.0")


def disagreement(fp: Fingerprint, name: str, cfg) -> str | None:
    """Why the checkpoint is not ``name`` (first disagreeing key / shape), or None if it fits."""
    if (fp.head == "v1") != (cfg.head == "v1"):
        return (f"the keys {'have' if fp.head == 'v1' else 'have no'} detect.obj_preds.* "
                f"({'v1.0 objectness head' if fp.head == 'v1' else 'no objectness: v2.0+ head'}), "
                f"{name} is {_version(cfg)}")
    if fp.bifpn != cfg.bifpn:
        return (f"the keys {'have' if fp.bifpn else 'have no'} neck.Bifusion0.* "
                f"({'v3.0 BiFusion neck' if fp.bifpn else 'RepPAN neck: v1.0 / v2.0'}), {name} is {_version(cfg)}")
    key, shape = fp.stem
    if shape[0] != cfg.channels_list[0]:
        return (f"{key} has shape {shape} (stem width {shape[0]}), {name} expects "
                f"({cfg.channels_list[0]}, 3, 3, 3)")
    if fp.er3_blocks != cfg.num_repeat[2]:
        return (f"backbone.ERBlock_3.1 has {fp.er3_blocks} RepVGG blocks (conv1 + block.*), "
                f"{name} has {cfg.num_repeat[2]} (depth {cfg.depth})")
    key, shape = fp.box
    if shape[0] != cfg.reg_channels:
        kind = {4: "ltrb boxes", 68: "DFL boxes, reg_max 16"}.get(shape[0], "unknown box head")
        return f"{key} has shape {shape} ({kind}), {name} expects {cfg.reg_channels} box channels"
    return None


def _describe(fp: Fingerprint) -> str:
    return (f"{fp.form} form, head {fp.head}{' (distilled)' if fp.distilled else ''}, "
            f"{'BiFusion' if fp.bifpn else 'RepPAN'} neck, {fp.stem[0]} {fp.stem[1]}, "
            f"{fp.er3_blocks} blocks in backbone.ERBlock_3.1, {fp.box[0]} {fp.box[1]}, nc {fp.num_classes}")


def resolve_arch(fp: Fingerprint, hint: str | None, cfgs: Mapping[str, Any]) -> str:
    """The registry name the fingerprint fits, checked against the ``--arch`` hint."""
    fits = [n for n, c in cfgs.items() if disagreement(fp, n, c) is None]
    if hint is None:
        if len(fits) == 1:
            return fits[0]
        if not fits:
            raise ValueError(f"no YOLOv6 architecture fits the checkpoint ({_describe(fp)}); "
                             f"known: {', '.join(sorted(cfgs))}")
        raise ValueError(f"ambiguous YOLOv6 checkpoint: {fits} all fit; pass --arch")
    if hint in cfgs:
        cands = [hint]
    else:
        cands = sorted(n for n in cfgs if n.startswith(hint + "_v"))
        if not cands:
            raise ValueError(f"unknown YOLOv6 architecture {hint!r}; known: {', '.join(sorted(cfgs))} "
                             "or a size alias (yolov6n, yolov6t, yolov6s)")
    ok = [n for n in cands if n in fits]
    if len(ok) == 1:
        return ok[0]
    if len(ok) > 1:
        raise ValueError(f"--arch {hint}: {ok} all fit; pass the full name")
    # Explain with the candidate of the same version when there is one.
    same = [n for n in cands if (cfgs[n].head == "v1") == (fp.head == "v1") and cfgs[n].bifpn == fp.bifpn]
    name = (same or cands)[0]
    why = disagreement(fp, name, cfgs[name])
    if not same and len(cands) > 1:
        why += f" (no {hint} of that version exists: {hint} is one of {', '.join(cands)})"
    fit = f"the keys and shapes fit {fits[0]}" if len(fits) == 1 else f"no known architecture fits them ({_describe(fp)})"
    raise ValueError(f"--arch {hint} disagrees with the checkpoint: {why}; {fit}")


# ----------------------------------------------------------------------------- conversion

def _check_model_shapes(arch: str, form: str, num_classes: int | None, flat: dict) -> None:
    """When ``arch`` is registered: the Flax model's variable tree must equal the converted one."""
    from cfws_jax.models import registry

    try:
        registry.get_config(arch)
    except ValueError:
        return  # models not registered (yet): the spec table alone decides
    from converters.convert import _flax_shapes

    want = _flax_shapes(arch, form == "deploy", num_classes)
    got = {k: tuple(v.shape) for k, v in flat.items()}
    if got != want:
        extra = sorted("/".join(k) for k in set(got) - set(want))
        lack = sorted("/".join(k) for k in set(want) - set(got))
        bad = sorted(f"{'/'.join(k)} {got[k]} vs {want[k]}" for k in set(got) & set(want) if got[k] != want[k])
        raise ValueError(f"internal: converter key map disagrees with create_model({arch!r}, deploy={form == 'deploy'}): "
                         f"not in the model {_summary(extra)}; not converted {_summary(lack)}; shapes {_summary(bad)}")


def convert_yolov6(state_dict: Mapping[str, Any], arch: str | None = None, *, num_classes: int | None = None):
    """YOLOv6 state dict -> ``converters.convert.ConvertResult`` (see the module docstring)."""
    from converters.convert import ConvertResult

    sd = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    sd, was_04 = normalise_keys(sd)
    sd, dropped, distilled = split_dropped(sd)
    fp = fingerprint(sd, distilled)
    cfgs = configs()
    arch = resolve_arch(fp, arch, cfgs)
    cfg = cfgs[arch]
    nc = fp.num_classes
    if num_classes is not None and num_classes != nc:
        raise ValueError(f"--num-classes {num_classes} disagrees with detect.cls_preds.0.weight "
                         f"{_shape(sd, 'detect.cls_preds.0.weight')} ({nc} classes)")
    table = key_table(cfg, fp.form, nc)
    missing = sorted(set(table) - set(sd))
    unexpected = sorted(set(sd) - set(table))
    mismatched = [f"{k} {_shape(sd, k)} (expected {table[k].shape})" for k in sorted(set(table) & set(sd))
                  if _shape(sd, k) != table[k].shape]
    if missing or unexpected or mismatched:
        parts = [f"state dict does not fit {arch} ({fp.form} form{', 0.4.x keys normalised' if was_04 else ''})"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", mismatched)):
            if items:
                parts.append(f"{title} {_summary(items)}")
        raise ValueError("; ".join(parts))
    flat = {leaf.flax: to_flax(sd[k], leaf.layout) for k, leaf in table.items()}
    model_nc = None if nc == cfg.num_classes else nc
    _check_model_shapes(arch, fp.form, model_nc, flat)
    return ConvertResult(arch, fp.form, "yolov6-0.4" if was_04 else "yolov6",
                         traverse_util.unflatten_dict(flat), model_nc, tuple(dropped))

"""Cross-layer equalization (CLE; Nagel et al., ICCV 2019) of deploy-form params.

Layouts: activations NHWC, conv kernels HWIO ``[kh, kw, C/groups, O]``, dense kernels ``[C, O]``.

For a pair of layers ``A -> B`` where ``A``'s output is read by ``B`` alone through positively
homogeneous ops only (``A``'s ReLU or none; a global average pool before a dense classifier),
``B(f(A(x))) == B'(f(A'(x)))`` with ``A'`` = ``A``'s output channel ``i`` (kernel and bias)
divided by ``s_i`` and ``B'`` = ``B``'s input channel ``i`` weights (a depthwise ``B``: its
filter ``i``) multiplied by ``s_i``. ``s_i = sqrt(r1_i / r2_i)`` (``r1_i`` = ``max|W|`` of
``A``'s output channel ``i``, ``r2_i`` = that of ``B``'s input channel ``i``) makes both
ranges ``sqrt(r1_i r2_i)``; sweeps over all pairs repeat until every ``|s_i - 1| < tol``.
Dead channels (``r1_i`` or ``r2_i`` below ``DEAD`` times its layer's largest; Apple's
MobileOne-S0 has such channels, weights ~1e-24 with a bias) keep ``s_i = 1``.

Pairs come from the traced graph (:func:`equalization_pairs`): a pair is skipped when ``A``'s
output has another reader (a residual add, a concat, an SE branch, a second layer, a network
output) or when an op between them is not positively homogeneous (SiLU, sigmoid, ...).
It acts on the fused float weights, before the CFWS split (which is then computed on them).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.extend.core import Literal

from cfws_jax.models.layers import QConv, QDense
from cfws_jax.ptq.graph import discover_layers, layer_name

HOMOGENEOUS_ACTS = (None, "relu")
DEAD = 1e-4  # a channel whose weight range is below DEAD x its layer's largest is left alone
# ops allowed between A's output and B's input: channel-wise and positively homogeneous
_PASS_OPS = ("reduce_sum", "div", "mul", "convert_element_type", "custom_jvp_call")


@dataclasses.dataclass(frozen=True)
class EqPair:
    """Layer ``first``'s output channels feed layer ``second``'s input channels one to one;
    ``groups`` is ``second``'s conv grouping (1 for dense)."""

    first: str
    second: str
    groups: int = 1


def _marker(tag: str):
    def ident(v):
        return v

    ident.__name__ = tag
    return jax.jit(ident)


def _trace(model: nn.Module, params, input_shape):
    """The model's jaxpr with each layer's input and output passed through a named identity
    ``jit`` (``in:<layer>`` / ``out:<layer>``)."""

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name != "__call__" or not isinstance(mod, (QConv, QDense)):
            return next_fun(*args, **kwargs)
        name = layer_name(mod)
        y = next_fun(_marker(f"in:{name}")(args[0]), *args[1:], **kwargs)
        return _marker(f"out:{name}")(y)

    def run(p, x):
        with nn.intercept_methods(interceptor):
            return model.apply({"params": p}, x)

    return jax.make_jaxpr(run)(params, jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)).jaxpr


def _passes(eqn) -> bool:
    """``eqn`` keeps channels apart and commutes with a positive per-channel scale."""
    prim = eqn.primitive.name
    if prim not in _PASS_OPS:
        return False
    if prim == "custom_jvp_call":
        return eqn.params.get("name") == "relu"
    if prim == "reduce_sum":  # a spatial pool: never over channels
        return eqn.invars[0].aval.ndim - 1 not in eqn.params["axes"]
    if prim in ("div", "mul"):  # by a scalar constant only
        return len(eqn.invars) == 2 and isinstance(eqn.invars[1], Literal)
    return True


def equalization_pairs(model: nn.Module, params, input_shape, layers=None) -> tuple[tuple[EqPair, ...], dict]:
    """``(pairs, skipped)``: the :class:`EqPair` of ``model`` in execution order, and
    ``{layer: reason}`` for every non-output layer whose output is not equalized."""
    layers = layers or discover_layers(model, {"params": params}, input_shape)
    info = {l.name: l for l in layers}
    jaxpr = _trace(model, params, input_shape)
    users: dict = {}
    for e in jaxpr.eqns:
        for v in e.invars:
            if not isinstance(v, Literal):
                users.setdefault(v, []).append(e)
    outs = {v for v in jaxpr.outvars if not isinstance(v, Literal)}
    marks = {e.params.get("name"): e for e in jaxpr.eqns if e.primitive.name in ("jit", "pjit")
             and str(e.params.get("name", "")).startswith(("in:", "out:"))}
    pairs, skipped = [], {}
    for l in layers:
        if l.act not in HOMOGENEOUS_ACTS:
            skipped[l.name] = f"activation {l.act} is not positively homogeneous"
            continue
        v = marks[f"out:{l.name}"].outvars[0]
        while True:
            u = users.get(v, [])
            if v in outs or len(u) != 1:
                reason = "a network output" if v in outs else f"read by {len(u)} ops"
                break
            e = u[0]
            name = str(e.params.get("name", ""))
            if e.primitive.name in ("jit", "pjit") and name.startswith("in:"):
                second = info[name[3:]]
                reason = None
                break
            if not _passes(e):
                reason = f"followed by {e.primitive.name}"
                break
            v = e.outvars[0]
        if reason is None:
            pairs.append(EqPair(l.name, second.name, second.groups if second.kind == "conv" else 1))
        elif v not in outs or l.index != len(layers) - 1:
            skipped[l.name] = reason
    return tuple(pairs), skipped


def _grouped(kernel, groups: int):
    """``kernel`` as ``[taps, C/groups, groups, O/groups]`` (dense ``[C, O]``: one tap, one group)."""
    k = kernel.reshape((-1,) + kernel.shape[-2:]) if kernel.ndim > 2 else kernel[None]
    return k.reshape(k.shape[0], k.shape[1], groups, k.shape[2] // groups)


def in_ranges(kernel, groups: int = 1):
    """``max|W|`` over the weights that read each input channel, ``[C]`` (channel ``g * C/groups + j``)."""
    r = jnp.max(jnp.abs(_grouped(kernel, groups)), axis=(0, 3))  # [C/groups, groups]
    return r.T.reshape(-1)


def out_ranges(kernel):
    """``max|W|`` of each output channel, ``[O]``."""
    return jnp.max(jnp.abs(kernel.reshape(-1, kernel.shape[-1])), axis=0)


def scale_in(kernel, s, groups: int = 1):
    """``kernel`` with the weights reading input channel ``i`` multiplied by ``s[i]``."""
    k = _grouped(kernel, groups)
    return (k * s.reshape(groups, -1).T[None, :, :, None]).reshape(kernel.shape)


def pair_scales(k1, k2, groups: int, dead: float = DEAD):
    """``s = sqrt(r1 / r2)`` per channel; 1 where either range is at most ``dead`` times its
    layer's largest (a dead channel: scaling its tiny weights up would scale its constant
    ``ReLU(bias)`` output by the same huge factor)."""
    r1, r2 = out_ranges(k1), in_ranges(k2, groups)
    ok = (r1 > dead * jnp.max(r1)) & (r2 > dead * jnp.max(r2)) & (r1 > 0) & (r2 > 0)
    return jnp.where(ok, jnp.sqrt(jnp.where(ok, r1, 1.0) / jnp.where(ok, r2, 1.0)), 1.0)


def _sweep(weights: dict, pairs: tuple[EqPair, ...]):
    """One pass over ``pairs`` in order; ``(weights, max |s - 1|)``."""
    w = dict(weights)
    dev = jnp.zeros((), jnp.float32)
    for p in pairs:
        a, b = dict(w[p.first]), dict(w[p.second])
        s = pair_scales(a["kernel"], b["kernel"], p.groups)
        a["kernel"] = a["kernel"] / s
        if "bias" in a:
            a["bias"] = a["bias"] / s
        b["kernel"] = scale_in(b["kernel"], s, p.groups)
        w[p.first], w[p.second] = a, b
        dev = jnp.maximum(dev, jnp.max(jnp.abs(s - 1.0)))
    return w, dev


def _equalize_loop(weights: dict, pairs: tuple[EqPair, ...], tol, max_iter: int):
    def cond(state):
        _, it, dev = state
        return (it < max_iter) & (dev >= tol)

    def body(state):
        w, it, _ = state
        w, dev = _sweep(w, pairs)
        return w, it + 1, dev

    return jax.lax.while_loop(cond, body, (weights, jnp.int32(0), jnp.float32(jnp.inf)))


equalize_weights_jit = jax.jit(_equalize_loop, static_argnames=("pairs", "max_iter"))


def equalize_weights(weights: Mapping[str, Mapping], pairs: tuple[EqPair, ...], *, tol: float = 1e-3,
                     max_iter: int = 500) -> tuple[dict, dict]:
    """Equalize ``{layer: {"kernel", "bias"?}}`` over ``pairs`` (jitted sweeps until every
    ``|s_i - 1| < tol`` or ``max_iter`` sweeps); ``(weights float32, {"iterations", "max_scale_change"})``."""
    names = {n for p in pairs for n in (p.first, p.second)}
    w = {n: {k: jnp.asarray(v, jnp.float32) for k, v in weights[n].items()} for n in names}
    w, it, dev = equalize_weights_jit(w, tuple(pairs), jnp.float32(tol), int(max_iter))
    out = {n: dict(v) for n, v in weights.items()}
    out.update({n: {k: np.asarray(a) for k, a in v.items()} for n, v in w.items()})
    return out, {"iterations": int(it), "max_scale_change": float(dev)}


def cross_layer_equalize(model: nn.Module, params, input_shape, *, tol: float = 1e-3,
                         max_iter: int = 500) -> tuple[dict, dict]:
    """Deploy-form ``params`` with every :func:`equalization_pairs` pair equalized (the same
    network function up to float32 rounding); ``(params, stats)`` with ``stats`` =
    ``{"pairs", "iterations", "max_scale_change", "skipped"}`` (``skipped``: ``{layer: reason}``)."""
    pairs, skipped = equalization_pairs(model, params, input_shape)
    flat = traverse_util.flatten_dict(dict(params))
    names = sorted({n for p in pairs for n in (p.first, p.second)})
    weights = {n: {k[-1]: v for k, v in flat.items() if k[:-1] == tuple(n.split("/"))} for n in names}
    new, stats = equalize_weights(weights, pairs, tol=tol, max_iter=max_iter)
    for n in names:
        for k, v in new[n].items():
            flat[(*n.split("/"), k)] = v
    stats = {"pairs": len(pairs), **stats, "skipped": skipped}
    return traverse_util.unflatten_dict(flat), stats

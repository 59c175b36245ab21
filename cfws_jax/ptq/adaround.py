"""Learned rounding (AdaRound) of one layer's stored integer codes, for ``plain`` and ``cfws`` layers.

Every weight gets a soft rounding variable ``v``; ``h(v)`` (rectified sigmoid, in ``[0, 1]``) is
added to the floor of ``w / s``; an annealed regularizer drives ``h`` to 0 or 1 and at the end
``h(v) >= 0.5`` is the rounding (hardening). Scales never change: they are part of the stored
model; only the integer codes do, and every code stays in ``[-qmax, qmax]``,
``qmax = 2^(w_bits-1) - 1``, with the stored dtype (see :mod:`cfws_jax.ptq.weights`).

Layouts: conv kernels HWIO ``[k, k, I/g, O]``, dense kernels ``[in, out]``; scales on the last
(output-channel) axis, ``(O,)`` or ``()`` (per-tensor plain). Activations NHWC / ``[N, in]``.

Soft kernel (one formula for both schemes, elementwise over the kernel):

* ``plain``: ``K = s * clip(floor(W/s) + h(v_f), -qmax, qmax)``.
* ``cfws``: coarse codes ``qc`` (the centre tap ``[I/g, O]``, or the whole HWIO kernel for the
  ``extract_center=False`` ablation) round ``W_c / s_c`` down (option 0) or up (option 1); for
  each option ``i`` the fine residual ``R_i`` is ``W`` with the coarse part replaced by
  ``W_c - s_c * qc_i`` and its fine floor base is ``bf_i = floor(R_i / s_f)`` (constants, computed
  once on the host). With ``hc = h(v_c)`` and ``f_i = clip(bf_i + h(v_f), -qmax, qmax)``::

      K = (1 - hc) * (s_c*qc_0 + s_f*f_0) + hc * (s_c*qc_1 + s_f*f_1)

  i.e. the expected kernel when the coarse code is drawn Bernoulli(``hc``) and the fine code is
  rounded against the residual of that coarse choice. At ``hc in {0, 1}`` it is exactly
  ``dequantize_layer``'s kernel of the hardened codes (fine base recomputed for the chosen
  coarse code), and it is continuous in both variables. Surround taps have no coarse part
  (``qc_0 = qc_1 = 0``) and reduce to the plain formula.

Weights whose stored code is not floor or ceil of ``w / s`` (the kernel does not match ``q``),
and zero-guarded channels (scale 1 with all-zero codes, i.e. an all-zero channel), are frozen at
their stored code; a frozen fine code freezes the coarse code of its tap. A coarse code is learned
only where the fine level can represent the residual of either coarse choice (both fine
roundings of it within range): there the soft kernel at initialization is exactly ``W`` and the
coarse choice selects between two interleaved fine grids (offset ``s_c mod s_f``). Where the
other choice would saturate the fine code (always for the whole-kernel split, whose fine scale
is ``~s_c / (2 qmax)``; at low bits for centre taps with a small surround) the coarse code stays
at its stored (nearest) value and only the fine rounding is learned.

Optimization (:func:`reconstruct_layer`): Adam (optax) on ``v_f``, ``v_c`` (and ``log amax`` of
the ``:in`` point with ``learn_act_step``), one jitted step per iteration in a host loop,
compiled once per layer structure (geometry, activation, input rounding, loss, QDrop on/off,
data shapes; every hyper-parameter and the seed are traced). On the CPU backend the step's conv
is :func:`cfws_jax.models.layers.conv2d_unrolled` (shifted views and a matmul / multiply-add
instead of a convolution op), whose kernel gradient XLA:CPU runs 5-50x faster: MobileOne-S0's
learning went from 546 s to 97 s for 20 iterations on 64 images, with the same losses. Batch rows are drawn without
replacement from ``fold_in(PRNGKey(seed), step)`` by :func:`_sample_block`; the variables start
at ``h(v) = rest``, i.e. the soft kernel starts at the float kernel.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cfws_jax.models.layers import activation
from cfws_jax.ptq.calibrate import _geometry
from cfws_jax.ptq.graph import LayerInfo
from cfws_jax.ptq.recon_checks import check_recon
from cfws_jax.ptq.runtime import layer_linear
from cfws_jax.ptq.weights import dequantize_layer
from cfws_jax.quant import ZERO_AMAX, fake_quant_symmetric, int_range, round_values

ZETA = 1.1
GAMMA = -0.1

TRACE_COUNTS: collections.Counter = collections.Counter()
"""How many times the jitted reconstruction (``"train"``) and evaluation (``"eval"``) functions
were traced (= compiled); tests use it to check one compile per layer structure."""


# ----------------------------------------------------------------------------------------------
# rounding variables (jitted: one compile per shape, also when called on host arrays)


@functools.partial(jax.jit, static_argnames=("zeta", "gamma"))
def rectified_sigmoid(v, zeta: float = ZETA, gamma: float = GAMMA):
    """``h(v) = clip(sigmoid(v) * (zeta - gamma) + gamma, 0, 1)``, elementwise (float32)."""
    v = jnp.asarray(v, jnp.float32)
    return jnp.clip(jax.nn.sigmoid(v) * (zeta - gamma) + gamma, 0.0, 1.0)


@functools.partial(jax.jit, static_argnames=("zeta", "gamma"))
def init_rounding_vars(rest, zeta: float = ZETA, gamma: float = GAMMA):
    """``v`` with ``rectified_sigmoid(v) == rest`` (``rest = w/s - floor(w/s)`` in ``[0, 1]``).

    ``v = -log((zeta - gamma) / (rest - gamma) - 1)``; ``rest`` is clipped to ``[0, 1]`` first,
    so ``v`` is always finite (``rest = 0`` -> ``-log(11)``, ``rest = 1`` -> ``log(11)``).
    """
    r = jnp.clip(jnp.asarray(rest, jnp.float32), 0.0, 1.0)
    return -jnp.log((zeta - gamma) / (r - gamma) - 1.0)


@jax.jit
def rounding_regularizer(v, beta, mask=None):
    """``sum(1 - |2 h(v) - 1|^beta)`` over the entries of ``v`` (where ``mask``, if given)."""
    t = 1.0 - jnp.abs(2.0 * rectified_sigmoid(v) - 1.0) ** beta
    return jnp.sum(t if mask is None else t * mask)


@jax.jit
def hard_rounding(v):
    """Hardened rounding of AdaRound: ``h(v) >= 0.5`` as int32 (0 = down, 1 = up)."""
    return (rectified_sigmoid(v) >= 0.5).astype(jnp.int32)


@jax.jit
def beta_schedule(step, iters, warmup, beta_start, beta_end):
    """``(beta, reg_on)`` at ``step`` (0-based) of ``iters`` steps, float32 scalars.

    ``w = floor(warmup * iters)``: no regularizer before step ``w`` (``reg_on = 0``); from ``w``
    on ``reg_on = 1`` and ``beta`` goes linearly from ``beta_start`` (step ``w``) to ``beta_end``
    (step ``iters - 1``).
    """
    step = jnp.asarray(step, jnp.float32)
    iters = jnp.asarray(iters, jnp.float32)
    w = jnp.floor(jnp.asarray(warmup, jnp.float32) * iters)
    frac = jnp.clip((step - w) / jnp.maximum(iters - 1.0 - w, 1.0), 0.0, 1.0)
    beta = beta_start + (jnp.asarray(beta_end, jnp.float32) - beta_start) * frac
    return beta.astype(jnp.float32), (step >= w).astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# the rounding problem of one layer


class Rounding(NamedTuple):
    """Host-side (NumPy) constants of one layer's rounding problem; all arrays have the kernel's
    shape (HWIO or [in, out]).

    ``s_f`` fine (or plain) scale broadcast; ``bf0`` / ``bf1`` fine floor bases for coarse option
    0 / 1 (equal where there is no coarse part); ``c0`` / ``c1`` ``s_c * qc_i`` (0 outside the
    coarse part); ``qc0`` / ``qc1`` coarse codes of the two options (None for plain); ``lf`` /
    ``lc`` 1.0 where the fine / coarse rounding is learned; ``vf0`` / ``vc0`` initial variables;
    ``centre``: index of the centre tap when the coarse codes are ``[I/g, O]`` (else None).
    """

    s_f: np.ndarray
    bf0: np.ndarray
    bf1: np.ndarray
    c0: np.ndarray
    c1: np.ndarray
    qc0: np.ndarray | None
    qc1: np.ndarray | None
    lf: np.ndarray
    lc: np.ndarray
    vf0: np.ndarray
    vc0: np.ndarray
    qmax: int
    centre: int | None

    def arrays(self) -> dict:
        """The jnp arrays :func:`soft_kernel` reads."""
        return {k: jnp.asarray(getattr(self, k)) for k in ("s_f", "bf0", "bf1", "c0", "c1", "lf", "lc")}


def _guard(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Per output channel: zero-guarded (scale 1, all codes 0), broadcast to ``codes``' shape."""
    scale = np.asarray(scale, np.float32)
    zero = np.all(codes == 0) if scale.ndim == 0 else np.all(codes.reshape(-1, codes.shape[-1]) == 0, axis=0)
    return np.broadcast_to((scale == 1.0) & zero, codes.shape)


def prepare_rounding(q: dict, kernel, w_bits: int, name: str = "layer") -> Rounding:
    """The rounding problem of stored arrays ``q`` (``plain`` or ``cfws``) of float ``kernel``."""
    if "w_codes" not in q:
        raise ValueError(f"{name}: learned rounding needs a plain or cfws layer (w_codes), got keys {sorted(q)}")
    w = np.asarray(kernel, np.float32)
    q0f = np.asarray(q["w_codes"]).astype(np.float32)
    if q0f.shape != w.shape:
        raise ValueError(f"{name}: kernel shape {w.shape} does not match w_codes {q0f.shape}")
    qmax = int_range(w_bits)[1]
    s_f = np.broadcast_to(np.asarray(q["w_scale"], np.float32), w.shape).astype(np.float32)
    zeros = np.zeros_like(w)
    centre = None
    if "c_codes" in q:
        cc = np.asarray(q["c_codes"]).astype(np.float32)
        cs = np.asarray(q["c_scale"], np.float32)
        in_c = np.zeros(w.shape, bool)
        q0c = zeros.copy()
        if cc.ndim == w.ndim:  # whole-kernel split
            if cc.shape != w.shape:
                raise ValueError(f"{name}: c_codes {cc.shape} do not match the kernel {w.shape}")
            in_c[...] = True
            q0c = cc
        else:
            if w.ndim != 4 or cc.shape != w.shape[2:] or w.shape[0] != w.shape[1] or w.shape[0] % 2 == 0:
                raise ValueError(f"{name}: centre codes {cc.shape} do not fit the kernel {w.shape}")
            centre = w.shape[0] // 2
            in_c[centre, centre] = True
            q0c[centre, centre] = cc
        s_c = np.broadcast_to(cs, w.shape).astype(np.float32)
        g_c = np.broadcast_to(_guard(cc, cs)[None, None] if cc.ndim < w.ndim else _guard(cc, cs), w.shape)
        uc = np.where(in_c, w, 0).astype(np.float32) / s_c
        bc = np.floor(uc)
        rc = uc - bc
        lc = in_c & ~g_c & ((q0c == bc) | (q0c == bc + 1))
    else:
        in_c = lc = np.zeros(w.shape, bool)
        q0c = s_c = bc = rc = zeros

    g_f = _guard(q0f, q["w_scale"])

    def options(lc):
        qc = [np.where(lc, np.clip(bc + i, -qmax, qmax), q0c).astype(np.float32) for i in (0, 1)]
        c = [np.where(in_c, s_c * qc[i], 0).astype(np.float32) for i in (0, 1)]
        uf = [(np.where(in_c, w - c[i], w).astype(np.float32) / s_f).astype(np.float32) for i in (0, 1)]
        return qc, c, uf

    qc, c, uf = options(lc)
    bf = [np.floor(u) for u in uf]
    k0 = lc & (q0c == qc[1])  # the stored (nearest) coarse choice is option 1
    near, other = np.where(k0, bf[1], bf[0]), np.where(k0, bf[0], bf[1])
    lf = ~g_f & ((q0f == near) | (q0f == near + 1))
    # learn a coarse code only where the fine level can absorb either choice (both fine roundings
    # of the other option's residual in range): elsewhere the other choice saturates the fine code
    lc = lc & lf & (other >= -qmax) & (other + 1 <= qmax)
    qc, c, uf = options(lc)
    bf = [np.where(lf, np.floor(u), q0f).astype(np.float32) for u in uf]
    rf = [np.where(lf, u - np.floor(u), 0).astype(np.float32) for u in uf]
    hc0 = np.where(lc, rc, 0).astype(np.float32)
    rest_f = ((1 - hc0) * rf[0] + hc0 * rf[1]).astype(np.float32)  # soft kernel at init == W
    return Rounding(
        s_f=s_f, bf0=bf[0], bf1=bf[1], c0=c[0], c1=c[1],
        qc0=qc[0] if "c_codes" in q else None, qc1=qc[1] if "c_codes" in q else None,
        lf=lf.astype(np.float32), lc=lc.astype(np.float32),
        vf0=np.asarray(init_rounding_vars(rest_f)), vc0=np.asarray(init_rounding_vars(hc0)),
        qmax=qmax, centre=centre)


def soft_kernel(arrays: dict, vf, vc, qmax):
    """Soft (differentiable) kernel, the kernel's shape, from :meth:`Rounding.arrays` and the
    fine / coarse rounding variables (see the module docstring)."""
    a = arrays
    hc = a["lc"] * rectified_sigmoid(vc)
    hf = a["lf"] * rectified_sigmoid(vf)
    f0 = jnp.clip(a["bf0"] + hf, -qmax, qmax)
    f1 = jnp.clip(a["bf1"] + hf, -qmax, qmax)
    return (1.0 - hc) * (a["c0"] + a["s_f"] * f0) + hc * (a["c1"] + a["s_f"] * f1)


def harden(r: Rounding, q: dict, vf, vc) -> dict:
    """Stored arrays with the hardened codes of ``vf`` / ``vc`` (same keys, dtypes, scales as ``q``)."""
    hc = (r.lc > 0) & (np.asarray(hard_rounding(vc)) > 0)
    hf = (r.lf > 0) & (np.asarray(hard_rounding(vf)) > 0)
    qf = np.clip(np.where(hc, r.bf1, r.bf0) + hf, -r.qmax, r.qmax)
    out = dict(q)
    out["w_codes"] = qf.astype(np.asarray(q["w_codes"]).dtype)
    if r.qc0 is not None:
        qc = np.where(hc, r.qc1, r.qc0)
        if r.centre is not None:
            qc = qc[r.centre, r.centre]
        out["c_codes"] = qc.astype(np.asarray(q["c_codes"]).dtype)
    return out


# ----------------------------------------------------------------------------------------------
# activation fake-quant with STE / LSQ gradients


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def fake_quant_lsq(x, amax, qmax, rounding: str = "half_even"):
    """``fake_quant_symmetric(x, amax, qmax, rounding)`` (per-tensor) with a straight-through
    gradient for ``x`` (inside the range) and the LSQ gradient for ``amax``
    (``d y / d s = round(x/s) - x/s`` inside, ``+-qmax`` outside; ``s = amax / qmax``)."""
    return fake_quant_symmetric(x, amax, qmax, rounding)


def _fq_fwd(x, amax, qmax, rounding):
    return fake_quant_symmetric(x, amax, qmax, rounding), (x, amax, qmax)


def _fq_bwd(rounding, res, g):
    x, amax, qmax = res
    live = amax > ZERO_AMAX
    s = jnp.where(live, amax / qmax, 1.0)
    t = x.astype(jnp.float32) / s
    r = round_values(t, rounding)
    inside = jnp.abs(t) <= qmax
    g = g.astype(jnp.float32)
    dyds = jnp.where(inside, r - t, jnp.clip(r, -qmax, qmax))
    damax = jnp.where(live, jnp.sum(g * dyds) / qmax, 0.0)
    return (g * inside).astype(x.dtype), damax.astype(jnp.asarray(amax).dtype), jnp.zeros_like(qmax)


fake_quant_lsq.defvjp(_fq_fwd, _fq_bwd)


# ----------------------------------------------------------------------------------------------
# reconstruction of one layer


@dataclasses.dataclass(frozen=True)
class ReconConfig:
    """Options of the learned rounding (see CONTRACTS / issue #14).

    ``loss``: "mse" / "mae" of the layer output, summed over output channels and averaged over
    rows and positions (AdaRound / BRECQ scaling, so ``reg_weight`` keeps its usual meaning);
    the reported ``loss_before`` / ``loss_after`` are per-element means.
    """

    iters: int = 200
    batch_size: int = 32
    lr: float = 1e-2
    reg_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    loss: str = "mse"
    qdrop_prob: float = 0.0
    learn_act_step: bool = False
    seed: int = 0

    def __post_init__(self):
        check_recon("ReconConfig", iters=("iters", self.iters), batch_size=("batch_size", self.batch_size),
                    lr=("lr", self.lr), reg_weight=("reg_weight", self.reg_weight), loss=("loss", self.loss),
                    qdrop=("qdrop_prob", self.qdrop_prob))
        if not 0.0 <= self.warmup <= 1.0:
            raise ValueError(f"ReconConfig.warmup must be in [0, 1], got {self.warmup}")
        if not (self.beta_start > 0 and self.beta_end > 0):
            raise ValueError(f"ReconConfig.beta_start and beta_end must be > 0, got {self.beta_start}, {self.beta_end}")


def _layer_out(geom, act, kernel, bias, x, unrolled: bool = False):
    return activation(layer_linear(geom, x, kernel, bias, unrolled), act)


def train_lowering_unrolled() -> bool:
    """Whether the training step lowers convs without a convolution op (on the CPU backend,
    where a convolution's kernel gradient is slow: see :func:`cfws_jax.models.layers.conv2d_unrolled`)."""
    return jax.default_backend() == "cpu"


def _err(y, t, loss):
    d = y - t
    return d * d if loss == "mse" else jnp.abs(d)


def _quant_in(x, amax, in_qmax, rounding):
    return x if rounding is None else fake_quant_lsq(x, amax, in_qmax, rounding)


def _amax_of(p, amax0, learn_act):
    return jnp.where(amax0 > ZERO_AMAX, jnp.exp(p["log_amax"]), amax0) if learn_act else amax0


def _init_params(vf, vc, amax0, learn_act):
    params = {"vf": jnp.asarray(vf), "vc": jnp.asarray(vc)}
    if learn_act:
        params["log_amax"] = jnp.log(jnp.maximum(jnp.float32(amax0), ZERO_AMAX))
    return params


SAMPLE_BLOCK = 64
"""Steps whose batches :func:`_sample_block` draws in one call."""


@functools.partial(jax.jit, static_argnames=("n", "batch"))
def _sample_block(seed, block, *, n, batch):
    """Batch rows and QDrop seeds of steps ``block * SAMPLE_BLOCK ...`` (+ ``SAMPLE_BLOCK``):
    ``idx`` ``(SAMPLE_BLOCK, batch)`` int32, rows without replacement, and ``bits``
    ``(SAMPLE_BLOCK, 2)`` uint32, all from ``fold_in(PRNGKey(seed), step)``. Compiled once per
    ``(n, batch)``: kept out of the step, where threefry would cost seconds of compile per layer."""
    TRACE_COUNTS["sample"] += 1
    steps = block * SAMPLE_BLOCK + jnp.arange(SAMPLE_BLOCK)

    def one(t):
        kb, kd = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), t))
        return jnp.argsort(jax.random.uniform(kb, (n,)))[:batch].astype(jnp.int32), jax.random.bits(kd, (2,))

    return jax.vmap(one)(steps)


def run_steps(step, params, opt_state, rcfg: ReconConfig, n: int, batch: int):
    """``rcfg.iters`` calls ``params, opt_state = step(params, opt_state, t, idx, bits)`` (host loop;
    rows ``idx`` and QDrop ``bits`` of step ``t`` from :func:`_sample_block`)."""
    seed = jnp.int32(rcfg.seed)
    for t in range(int(rcfg.iters)):
        if t % SAMPLE_BLOCK == 0:
            idx, bits = map(np.asarray, _sample_block(seed, jnp.int32(t // SAMPLE_BLOCK), n=n, batch=batch))
        j = t % SAMPLE_BLOCK
        params, opt_state = step(params, opt_state, jnp.int32(t), idx[j], bits[j])
    return params, opt_state


def _fmix32(h):
    """murmur3's 32-bit finalizer (a bijective avalanche mix of uint32)."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def qdrop_mask(bits, prob, shape):
    """Bool mask of ``shape``, True with probability ``prob`` per element: a counter hash of the
    element index keyed by two uint32 ``bits`` (from the step's jax.random key)."""
    size = int(np.prod(shape))
    c = jnp.arange(size, dtype=jnp.uint32)
    h = _fmix32(_fmix32(c ^ bits[0]) ^ bits[1])
    u = (h >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)  # uniform in [0, 1), 24 bits
    return (u < prob).reshape(shape)


@functools.partial(jax.jit, static_argnames=("geom", "act", "rounding", "learn_act", "loss", "qdrop", "unrolled"))
def _step(params, opt_state, t, idx, bits, arrays, bias, x_q, x_fp, y_fp, amax0, in_qmax, w_qmax, hyper, *, geom,
          act, rounding, learn_act, loss, qdrop, unrolled=False):
    """One Adam step at step ``t`` on the rows ``idx`` ``(B,)`` (QDrop mask from ``bits``);
    returns the new ``(params, opt_state)``.

    A jitted step in a host loop, not a ``lax.scan``: XLA:CPU runs a conv inside a while loop
    about 20x slower than the same conv at the top level of a program (measured). ``unrolled``:
    the layer's conv as :func:`cfws_jax.models.layers.conv2d_unrolled` (same math; on XLA:CPU
    its kernel gradient is 5-50x faster than a convolution op's).
    """
    TRACE_COUNTS["train"] += 1
    opt = optax.adam(hyper["lr"])
    mask_reg = {"vf": arrays["lf"], "vc": arrays["lc"]}
    beta, reg_on = beta_schedule(t, hyper["iters"], hyper["warmup"], hyper["beta_start"], hyper["beta_end"])

    def objective(p):
        x = _quant_in(x_q[idx], _amax_of(p, amax0, learn_act), in_qmax, rounding)
        if qdrop:
            x = jnp.where(qdrop_mask(bits, hyper["qdrop"], x.shape), x_fp[idx], x)
        y = _layer_out(geom, act, soft_kernel(arrays, p["vf"], p["vc"], w_qmax), bias, x, unrolled)
        rec = jnp.mean(jnp.sum(_err(y, y_fp[idx], loss), axis=-1))
        reg = sum(rounding_regularizer(p[k], beta, mask_reg[k]) for k in ("vf", "vc"))
        return rec + reg_on * hyper["reg_weight"] * reg

    upd, opt_state = opt.update(jax.grad(objective)(params), opt_state, params)
    return optax.apply_updates(params, upd), opt_state


@functools.partial(jax.jit, static_argnames=("geom", "act", "rounding", "loss", "batch"))
def _eval_chunk(kernel, bias, x_q, y_fp, amax, in_qmax, start, *, geom, act, rounding, loss, batch):
    """Sum of the error of the hard layer on rows ``start .. start+batch-1`` of all N rows
    (rows past N masked out), float32."""
    TRACE_COUNTS["eval"] += 1
    n = x_q.shape[0]
    rows = start + jnp.arange(batch)
    valid = rows < n
    rows = jnp.minimum(rows, n - 1)
    x = _quant_in(x_q[rows], amax, in_qmax, rounding)
    e = _err(_layer_out(geom, act, kernel, bias, x), y_fp[rows], loss)
    return jnp.sum(jnp.where(valid.reshape((-1,) + (1,) * (e.ndim - 1)), e, 0.0))


def reconstruct_layer(q, kernel, bias, *, info: LayerInfo, act, x_q, x_fp, y_fp, in_quant, w_bits, config,
                      rcfg: ReconConfig) -> tuple[dict, dict]:
    """Learn the rounding of one layer's codes so that ``act(linear(in_quant(x_q)))`` matches ``y_fp``.

    ``q``: stored arrays (``plain`` / ``cfws``, weights.py layout); ``kernel``: float kernel (HWIO
    or ``[in, out]``) ``q`` was made from; ``bias``: float bias or None (the forward uses ``q``'s
    own, dequantized, bias when it stores one, as the quantized network does); ``x_q`` / ``x_fp``
    ``[N, H, W, C]`` or ``[N, in]``: the layer input in the quantized / float network, before the
    layer's ``:in`` point; ``y_fp``: float target ``[N, ..., O]``; ``in_quant``: None or
    ``(amax, qmax, rounding)`` of the ``:in`` point; ``w_bits``: weight bits of ``q``; ``config``:
    the QuantConfig (informational: the scheme, split and scales are read from ``q``).

    Returns ``(new_q, stats)``: ``new_q`` has the keys, dtypes, shapes and scales of ``q`` (only
    codes change); ``stats = {"loss_before", "loss_after", "seconds", "accepted"}`` (+ ``"in_amax"``
    with ``rcfg.learn_act_step`` and an ``:in`` point), losses per element on all N rows;
    ``loss_after <= loss_before`` always (``q`` itself is returned when learning does not help).
    ``rcfg.iters == 0`` returns ``q``'s codes unchanged (round-to-nearest when ``q`` comes from
    :func:`cfws_jax.ptq.weights.quantize_layer`, plain and CFWS alike), only measured
    (:func:`kept_stats`).
    """
    del config
    t0 = time.perf_counter()
    name = info.name or "layer"
    r = prepare_rounding(q, kernel, w_bits, name)
    x_q = jnp.asarray(x_q, jnp.float32)
    x_fp = jnp.asarray(x_fp, jnp.float32)
    y_fp = jnp.asarray(y_fp, jnp.float32)
    if x_q.shape != x_fp.shape or x_q.shape[0] != y_fp.shape[0] or x_q.shape[0] < 1:
        raise ValueError(f"{name}: x_q {x_q.shape}, x_fp {x_fp.shape} and y_fp {y_fp.shape} must share N >= 1 "
                         "rows (and x_q / x_fp one shape)")
    deq = dequantize_layer(q)
    b = deq.get("bias", None if bias is None else np.asarray(bias, np.float32))
    b = None if b is None else jnp.asarray(b)
    if in_quant is None:
        rounding, amax0, in_qmax = None, jnp.float32(0), jnp.float32(1)
    else:
        amax0, in_qmax, rounding = in_quant
        amax0, in_qmax = jnp.float32(amax0), jnp.float32(in_qmax)
    learn_act = bool(rcfg.learn_act_step and in_quant is not None)
    geom = _geometry(info)
    n = x_q.shape[0]
    batch = min(rcfg.batch_size, n)
    hyper = {k: jnp.float32(v) for k, v in dict(
        iters=rcfg.iters, lr=rcfg.lr, reg_weight=rcfg.reg_weight, beta_start=rcfg.beta_start,
        beta_end=rcfg.beta_end, warmup=rcfg.warmup, qdrop=rcfg.qdrop_prob).items()}
    per = float(np.prod(y_fp.shape))

    def loss_of(qq, amax) -> float:
        k = jnp.asarray(dequantize_layer(qq)["kernel"])
        sums = [_eval_chunk(k, b, x_q, y_fp, jnp.float32(amax), in_qmax, jnp.int32(i), geom=geom, act=act,
                            rounding=rounding, loss=rcfg.loss, batch=batch) for i in range(0, n, batch)]
        return float(np.sum(np.asarray(sums, np.float64))) / per

    if rcfg.iters == 0:
        return dict(q), kept_stats(loss_of, q, amax0, learn_act)
    params = _init_params(r.vf0, r.vc0, amax0, learn_act)
    opt_state = optax.adam(hyper["lr"]).init(params)
    args = (r.arrays(), b, x_q, x_fp, y_fp, amax0, in_qmax, jnp.float32(r.qmax), hyper)
    static = dict(geom=geom, act=act, rounding=rounding, learn_act=learn_act, loss=rcfg.loss,
                  qdrop=rcfg.qdrop_prob > 0, unrolled=train_lowering_unrolled())
    params, opt_state = run_steps(lambda p, o, t, idx, bits: _step(p, o, t, idx, bits, *args, **static),
                                  params, opt_state, rcfg, n, batch)
    new_q = harden(r, q, params["vf"], params["vc"])
    amax1 = np.float32(_amax_of(params, amax0, learn_act))
    out_q, stats = accept_if_better(loss_of, q, new_q, amax0, amax1, learn_act, t0)
    return (dict(out_q) if out_q is q else out_q), stats


def kept_stats(loss_of, stored, amax0, learn_act: bool) -> dict:
    """The statistics of zero iterations: ``stored`` (round-to-nearest, as quantized) kept and
    measured, ``{"loss_before" == "loss_after", "seconds": 0.0, "accepted": False}`` (+ ``"in_amax"``:
    ``amax0``, with ``learn_act``). The hardened initial variables are not used: for CFWS centre
    taps they are not round-to-nearest (the coarse code rounds half up and the fine code against
    a blend of both coarse choices' residuals)."""
    loss = loss_of(stored, amax0)
    stats = {"loss_before": loss, "loss_after": loss, "seconds": 0.0, "accepted": False}
    if learn_act:
        stats["in_amax"] = float(amax0)
    return stats


def accept_if_better(loss_of, old, new, amax0, amax1, learn_act: bool, t0: float):
    """``(kept, stats)``: ``new`` (with the learned ``amax1`` and / or the calibrated ``amax0``
    when ``learn_act``, whichever ``loss_of(weights, amax)`` finds lowest) if its loss on all rows
    is below ``old``'s with ``amax0``, else ``old``; ``stats`` = ``{"loss_before", "loss_after",
    "seconds" (since ``t0``), "accepted"}`` (+ ``"in_amax"`` with ``learn_act``)."""
    before = loss_of(old, amax0)
    cands = [(loss_of(new, amax1), new, amax1)]
    if learn_act:
        cands += [(loss_of(new, amax0), new, np.float32(amax0)), (loss_of(old, amax1), old, amax1)]
    best = min(cands, key=lambda c: c[0])
    accepted = best[0] < before
    kept, after, amax_out = (best[1], best[0], best[2]) if accepted else (old, before, np.float32(amax0))
    stats = {"loss_before": before, "loss_after": after, "seconds": time.perf_counter() - t0,
             "accepted": bool(accepted)}
    if learn_act:
        stats["in_amax"] = float(amax_out)
    return kept, stats

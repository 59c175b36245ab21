"""The jitted YOLOv6 train step (training form, BatchNorm in training mode) and EMA prediction.

``TrainState`` is a pytree of arrays (params, batch_stats, optimizer state, EMA variables, step
counter), so orbax saves and restores it whole and a resumed run continues bit for bit.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from cfws_jax.train.anchors import flatten_levels
from cfws_jax.train.losses import LossConfig, detection_loss
from cfws_jax.train.lowering import conv_lowering
from cfws_jax.train.optim import OptimConfig, ema_update, set_lr

CLS_PRIOR = 0.01
"""Initial class probability of every anchor (the cls_preds bias -log((1 - p) / p), as RetinaNet):
the classification loss starts small instead of swamping the box loss."""

REG_PRIOR = 1.0
"""Initial ltrb distance (in strides) of a 4-channel box head (reg_preds bias): every anchor starts
with a 2x2-cell box around its point instead of a degenerate one, so IoUs and the task-aligned
metric are non-zero from the first step. (A DFL head starts from uniform bins.)"""


class TrainState(NamedTuple):
    params: dict
    batch_stats: dict
    opt_state: tuple
    ema: dict  # {"params", "batch_stats"}
    step: jnp.ndarray  # int32 scalar: updates done


def prior_bias(params, prior: float = CLS_PRIOR, reg_prior: float = REG_PRIOR, reg_max: int = 0):
    """``params`` with every ``detect/cls_preds_*/bias`` set to ``-log((1 - prior) / prior)`` and,
    for a 4-channel box head (``reg_max == 0``), every ``detect/reg_preds_*/bias`` to ``reg_prior``."""
    b0 = -math.log((1 - prior) / prior)

    def f(path, x):
        keys = [getattr(k, "key", "") for k in path]
        if keys[-1] != "bias":
            return x
        if any(k.startswith("cls_preds_") for k in keys):
            return jnp.full_like(x, b0)
        if not reg_max and any(k.startswith("reg_preds_") for k in keys):
            return jnp.full_like(x, reg_prior)
        return x

    return jax.tree_util.tree_map_with_path(f, params)


def init_state(model, rng, canvas: int, tx: optax.GradientTransformation) -> TrainState:
    """Fresh variables for ``[1, canvas, canvas, 3]`` inputs (cls prior bias), optimizer state and
    EMA (= the initial variables)."""
    v = jax.jit(lambda r: model.init(r, jnp.zeros((1, canvas, canvas, 3), jnp.float32), train=False))(rng)
    params = prior_bias(v["params"], reg_max=model.config.reg_max)
    bs = v["batch_stats"]
    ema = jax.tree_util.tree_map(jnp.array, {"params": params, "batch_stats": bs})  # own buffers (donation)
    return TrainState(params, bs, tx.init(params), ema, jnp.zeros((), jnp.int32))


def images_to_input(images_u8):
    """uint8 ``[B, S, S, 3]`` -> float32 in [0, 1] (the detector's input convention)."""
    return images_u8.astype(jnp.float32) / jnp.float32(255.0)


def make_train_step(model, tx: optax.GradientTransformation, *, loss_cfg: LossConfig = LossConfig(),
                    optim_cfg: OptimConfig = OptimConfig(), unrolled: bool = False):
    """Jitted ``step(state, images uint8 [B,S,S,3], boxes [B,M,4], classes [B,M], mask [B,M], lr,
    ema_tau=None) -> (state, metrics)``; metrics ``{"loss", "cls", "iou", "dfl", "fg"}`` (float32
    scalars). ``lr`` and ``ema_tau`` (None: ``optim_cfg.ema_tau``) are traced: one compile.

    ``unrolled``: QConvs through the matmul lowering (:mod:`cfws_jax.train.lowering`). The state is
    donated (updated in place)."""
    reg_max = model.config.reg_max

    def loss_fn(params, batch_stats, x, boxes, classes, mask):
        with conv_lowering(unrolled):
            levels, new = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                      decode=False, mutable=["batch_stats"])
        preds = flatten_levels(levels, x.shape[1:3], reg_max)
        loss, pieces = detection_loss(preds, boxes, classes, mask, reg_max, loss_cfg)
        return loss, (new["batch_stats"], pieces)

    def step(state: TrainState, images, boxes, classes, mask, lr, ema_tau):
        x = images_to_input(images)
        (loss, (bs, pieces)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.batch_stats, x, boxes.astype(jnp.float32), classes.astype(jnp.int32),
            mask.astype(bool))
        opt_state = set_lr(state.opt_state, lr)
        updates, opt_state = tx.update(grads, opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        n = state.step + 1
        ema = ema_update(state.ema, {"params": params, "batch_stats": bs}, n, optim_cfg.ema_decay, ema_tau)
        return TrainState(params, bs, opt_state, ema, n), {"loss": loss, **pieces}

    jitted = jax.jit(step, donate_argnums=(0,))

    def run(state, images, boxes, classes, mask, lr, ema_tau=None):
        tau = optim_cfg.ema_tau if ema_tau is None else ema_tau
        return jitted(state, images, boxes, classes, mask, jnp.float32(lr), jnp.float32(tau))

    return run


def make_predict(model):
    """Jitted ``predict(variables, images uint8 [B,S,S,3]) -> decoded [B, N, 5 + nc]`` (eval-mode
    BatchNorm; ``variables`` e.g. the EMA ones)."""
    return jax.jit(lambda v, images: model.apply(v, images_to_input(images), train=False))

"""Optimizer, learning-rate schedule and weight EMA for detector training.

* SGD, momentum 0.937, Nesterov (YOLOv6's settings); weight decay added to the gradient of conv
  kernels only (an optax mask: no decay on biases or BatchNorm scale / bias); the learning rate is
  an injected hyperparameter set every step from :func:`lr_at` (so a run's schedule can be fixed
  after it starts and a resumed run recomputes it exactly).
* :func:`lr_at`: linear warm-up from 0 to ``lr`` over ``warmup`` steps, then cosine from ``lr``
  down to ``lr * final_ratio`` at ``total``.
* EMA (YOLOv5 / YOLOv6 ``ModelEMA``): after update ``u`` (1-based),
  ``ema = d·ema + (1 - d)·new`` with ``d = decay·(1 - exp(-u / tau))``, decay 0.9999, tau 2000:
  the average starts as the live weights and its horizon ``1 / (1 - d)`` grows like ``exp(u / tau)``
  up to 10^4 updates, about 5 % of YOLOv6's COCO schedule (~2·10^5 updates). In a run of a few
  hundred updates tau 2000 would never average and a small fixed tau would freeze the EMA early, so
  :func:`ema_tau_for` picks the tau that gives a run of T updates the same end horizon, 5 % of T:
  ``tau = T / ln(0.05 T)`` (at most 2000). Both params and BatchNorm statistics are averaged.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 0.02
    momentum: float = 0.937
    nesterov: bool = True
    weight_decay: float = 5e-4
    final_ratio: float = 0.01
    ema_decay: float = 0.9999
    ema_tau: float = 2000.0


def kernel_mask(params):
    """True on conv / dense ``kernel`` leaves (the decayed ones), False elsewhere."""
    return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


def make_optimizer(cfg: OptimConfig = OptimConfig()) -> optax.GradientTransformation:
    """``add_decayed_weights`` (kernels only) then SGD with an injected ``learning_rate``."""
    return optax.chain(
        optax.add_decayed_weights(cfg.weight_decay, mask=kernel_mask),
        optax.inject_hyperparams(optax.sgd)(learning_rate=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov),
    )


def set_lr(opt_state, lr):
    """The optimizer state of :func:`make_optimizer` with its learning rate replaced (pure)."""
    decay, sgd = opt_state
    return (decay, sgd._replace(hyperparams={**sgd.hyperparams, "learning_rate": jnp.asarray(lr, jnp.float32)}))


def lr_at(step: int, total: int, warmup: int, lr: float, final_ratio: float = 0.01) -> float:
    """Learning rate of 0-based ``step`` (host float; see the module docstring)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def ema_decay(updates, decay: float = 0.9999, tau: float = 2000.0):
    """``decay·(1 - exp(-updates / tau))`` (jnp; ``updates`` counts from 1)."""
    return decay * (1.0 - jnp.exp(-jnp.asarray(updates, jnp.float32) / tau))


def ema_tau_for(total: int, horizon: float = 0.05, cap: float = 2000.0) -> float:
    """The EMA ramp ``tau`` whose horizon at the last of ``total`` updates is ``horizon * total``
    updates: ``exp(total / tau) = horizon * total`` (at most ``cap``; ``tau = total`` when the
    run is too short for any averaging)."""
    target = horizon * total
    return float(min(cap, total / math.log(target))) if target > math.e else float(max(1, total))


def ema_update(ema, new, updates, decay: float = 0.9999, tau: float = 2000.0):
    """``d·ema + (1 - d)·new`` leaf by leaf, ``d = ema_decay(updates)``."""
    d = ema_decay(updates, decay, tau)
    return jax.tree_util.tree_map(lambda e, n: d * e + (1 - d) * n, ema, new)

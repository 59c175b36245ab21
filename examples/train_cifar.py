"""Train a multi-branch RepVGG on CIFAR-10 with optax (the model shipped for ``cfws-jax demo``).

Every branch has BatchNorm, as in the paper's networks. Random crop (pad 4) + horizontal flip,
SGD with Nesterov momentum, weight decay on kernels, linear warm-up then cosine decay, a
jitted train step, a progress bar, resumable orbax checkpoints, and a fixed seed.

    python examples/train_cifar.py --data ../shared/data/cifar10_jpeg_yoongikim.npz \
        --arch repvgg_a0_cifar --epochs 60 --out runs/a0 [--max-minutes 7]

``--max-minutes`` fixes the number of epochs after timing the first one so the run (and its
cosine schedule) ends inside the budget. The result ``OUT/final.npz`` holds the training-form
variables (``params/...`` and ``batch_stats/...`` flattened with ``/``), the format of
``cfws_jax/assets``; ``OUT/log.json`` records epochs, wall time, device and accuracy.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cfws_jax.assets import flatten_variables
from cfws_jax.data.preprocess import CIFAR10
from cfws_jax.models import create_model
from cfws_jax.progress import Progress


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="CIFAR-10 npz with x_train, y_train, x_test, y_test")
    p.add_argument("--arch", default="repvgg_a0_cifar")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--max-minutes", type=float, default=None, help="cap epochs to fit this wall time")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--ckpt-every", type=int, default=5, help="orbax checkpoint every N epochs")
    return p.parse_args(argv)


def load_cifar(path):
    with np.load(path) as d:
        return (d["x_train"], d["y_train"].astype(np.int32), d["x_test"], d["y_test"].astype(np.int32))


def normalize(x_uint8):
    """uint8 NHWC -> float32 in jnp, the preprocessing of the CIFAR data sources."""
    return CIFAR10(x_uint8, xp=jnp)


def augment(rng, x):
    """Random crop 32x32 from the 4-pixel zero-padded image and random horizontal flip. x: NHWC uint8."""
    n = x.shape[0]
    k1, k2, k3 = jax.random.split(rng, 3)
    xp = jnp.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)))
    dy = jax.random.randint(k1, (n,), 0, 9)
    dx = jax.random.randint(k2, (n,), 0, 9)
    crop = jax.vmap(lambda im, a, b: jax.lax.dynamic_slice(im, (a, b, 0), (32, 32, 3)))(xp, dy, dx)
    flip = jax.random.bernoulli(k3, 0.5, (n,))
    return jnp.where(flip[:, None, None, None], crop[:, :, ::-1], crop)


def kernel_mask(params):
    """Weight decay only on conv / dense kernels (not BN scale/bias, not biases)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "kernel", params)


def lr_at(step, total_steps, warmup_steps, base_lr):
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * min(t, 1.0)))


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    x_train, y_train, x_test, y_test = load_cifar(args.data)
    model = create_model(args.arch, deploy=False)
    rng = jax.random.PRNGKey(args.seed)
    rng, init_rng = jax.random.split(rng)
    variables = model.init(init_rng, jnp.zeros((1, 32, 32, 3), jnp.float32), train=False)
    params, batch_stats = variables["params"], variables["batch_stats"]

    tx = optax.chain(
        optax.add_decayed_weights(args.weight_decay, mask=kernel_mask(params)),
        optax.inject_hyperparams(optax.sgd)(learning_rate=args.lr, momentum=0.9, nesterov=True),
    )
    opt_state = tx.init(params)

    def loss_fn(p, bs, x, y):
        logits, new_state = model.apply({"params": p, "batch_stats": bs}, x, train=True, mutable=["batch_stats"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, (new_state["batch_stats"], logits)

    @jax.jit
    def train_step(p, bs, opt_state, x_u8, y, rng, lr):
        x = normalize(augment(rng, x_u8))
        opt_state[1].hyperparams["learning_rate"] = lr
        (loss, (bs, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, bs, x, y)
        updates, opt_state = tx.update(grads, opt_state, p)
        p = optax.apply_updates(p, updates)
        acc = jnp.mean(jnp.argmax(logits, -1) == y)
        return p, bs, opt_state, loss, acc

    @jax.jit
    def eval_step(p, bs, x_u8):
        return jnp.argmax(model.apply({"params": p, "batch_stats": bs}, normalize(x_u8), train=False), -1)

    def evaluate(p, bs, bsz=500):
        correct = 0
        for i in range(0, len(x_test), bsz):
            correct += int((np.asarray(eval_step(p, bs, x_test[i:i + bsz])) == y_test[i:i + bsz]).sum())
        return correct / len(x_test)

    steps_per_epoch = len(x_train) // args.batch_size
    perm_rng = np.random.default_rng(args.seed)
    x_dev, y_dev = jax.device_put(x_train), jax.device_put(y_train)
    start_epoch, epochs = 0, args.epochs
    ckpt_dir = os.path.abspath(os.path.join(args.out, "ckpt"))
    log = {"arch": args.arch, "device": str(jax.devices()[0]), "seed": args.seed, "history": []}
    resumed = _try_restore(ckpt_dir, (params, batch_stats, opt_state, rng))
    if resumed is not None:
        (params, batch_stats, opt_state, rng), meta = resumed
        start_epoch, epochs = meta["epoch"], meta["epochs"]
        log = meta["log"]
        for _ in range(start_epoch):  # replay the permutation stream for determinism
            perm_rng.permutation(len(x_train))
        print(f"resumed from {ckpt_dir} at epoch {start_epoch}/{epochs}", file=sys.stderr)

    t0 = time.time()
    times: list[float] = []
    epoch = start_epoch
    while epoch < epochs:
        te = time.time()
        perm = jnp.asarray(perm_rng.permutation(len(x_train))[: steps_per_epoch * args.batch_size])
        total_steps = epochs * steps_per_epoch
        bar = Progress(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{epochs}", unit="step")
        for s in range(steps_per_epoch):
            step = epoch * steps_per_epoch + s
            idx = perm[s * args.batch_size:(s + 1) * args.batch_size]
            rng, sk = jax.random.split(rng)
            lr = lr_at(step, total_steps, int(args.warmup_epochs * steps_per_epoch), args.lr)
            params, batch_stats, opt_state, loss, acc = train_step(
                params, batch_stats, opt_state, x_dev[idx], y_dev[idx], sk, jnp.float32(lr))
            if s % 50 == 0:
                bar.set_postfix(f"loss {float(loss):.3f} acc {float(acc):.3f} lr {lr:.4f}")
            bar.update(1)
        bar.close()
        epoch += 1
        dt = time.time() - te
        times.append(dt)
        if args.max_minutes and epoch >= start_epoch + 2:
            # re-plan every epoch from the mean epoch time so far (epoch 1 includes compilation);
            # the plan only shrinks, so the cosine schedule ends inside the budget
            per_epoch = 1.1 * sum(times[1:]) / len(times[1:])
            fit = epoch + int((args.max_minutes * 60 - (time.time() - t0)) / per_epoch)
            if fit < epochs:
                epochs = max(fit, epoch)
                print(f"time budget {args.max_minutes} min: training {epochs} epochs", file=sys.stderr)
        test_acc = evaluate(params, batch_stats) if (epoch % 5 == 0 or epoch == epochs) else None
        log["history"].append({"epoch": epoch, "seconds": round(dt, 2), "test_top1": test_acc})
        print(json.dumps(log["history"][-1]), file=sys.stderr)
        if epoch % args.ckpt_every == 0 and epoch < epochs:
            _try_save(ckpt_dir, (params, batch_stats, opt_state, rng), {"epoch": epoch, "epochs": epochs, "log": log})

    log.update(epochs=epochs, wall_seconds=round(time.time() - t0, 1),
               test_top1=evaluate(params, batch_stats), steps_per_epoch=steps_per_epoch,
               batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay)
    flat = flatten_variables({"params": params, "batch_stats": batch_stats})
    np.savez(os.path.join(args.out, "final.npz"), **flat)
    with open(os.path.join(args.out, "log.json"), "w") as f:
        json.dump(log, f, indent=1)
    print(json.dumps({k: v for k, v in log.items() if k != "history"}))
    return 0


def _try_save(directory, state, meta):
    try:
        import orbax.checkpoint as ocp

        path = os.path.join(directory, f"epoch_{meta['epoch']}")
        ocp.PyTreeCheckpointer().save(path, jax.device_get(state), force=True)
        with open(os.path.join(directory, "latest.json"), "w") as f:
            json.dump({**meta, "path": path}, f)
    except Exception as e:  # a failed checkpoint must not kill a training run
        print(f"warning: checkpoint not saved: {e}", file=sys.stderr)


def _try_restore(directory, like):
    latest = os.path.join(directory, "latest.json")
    if not os.path.exists(latest):
        return None
    import orbax.checkpoint as ocp

    with open(latest) as f:
        meta = json.load(f)
    state = ocp.PyTreeCheckpointer().restore(meta["path"], item=jax.device_get(like))
    return state, meta


if __name__ == "__main__":
    sys.exit(main())

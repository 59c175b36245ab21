"""Classification accuracy (top-1 / top-5), jitted and batched.

The model is any ``apply_fn(images float32 [B, H, W, 3]) -> logits [B, C]`` (float params,
fake-quant or int8 path alike); prefer ``jax.tree_util.Partial(fn, variables)`` for real models
(see :func:`make_eval_step`). Every batch is padded to ``batch_size`` and the padding rows are
masked out, so the jitted step compiles exactly once. Counts are exact integers; ties in the
logits are broken toward the lower class index (``lax.top_k``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cfws_jax.progress import Progress


def topk_correct(logits, labels, mask, k: int):
    """Number of unmasked rows whose label is among the ``k`` largest logits (int32 scalar).

    logits ``[B, C]``, labels int ``[B]``, mask bool ``[B]``; ``1 <= k <= C``.
    """
    _, idx = jax.lax.top_k(logits, k)
    hit = jnp.any(idx == labels[:, None].astype(idx.dtype), axis=-1) & mask
    return jnp.sum(hit, dtype=jnp.int32)


def _counts(logits, labels, mask):
    if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"apply_fn must return logits [B, classes] with B={labels.shape[0]}, "
                         f"got shape {logits.shape}")
    c = logits.shape[-1]
    return (topk_correct(logits, labels, mask, 1), topk_correct(logits, labels, mask, min(5, c)),
            jnp.int32(c))


def make_eval_step(apply_fn):
    """Jitted ``step(images, labels, mask) -> (top1 count, top-min(5, C) count, C)``.

    A ``jax.tree_util.Partial(fn, variables)`` is passed to the jitted step as an argument, so
    its arrays are not baked into the compiled program as constants (much faster compiles for
    big models); any other callable is closed over.
    """
    if isinstance(apply_fn, jax.tree_util.Partial):
        step = jax.jit(lambda fn, x, y, m: _counts(fn(x), y, m))
        return lambda x, y, m: step(apply_fn, x, y, m)
    return jax.jit(lambda x, y, m: _counts(apply_fn(x), y, m))


def pad_batch(images, labels, batch_size: int):
    """Pad a host batch of ``b <= batch_size`` rows with zeros -> (images, labels, mask)."""
    images, labels = np.asarray(images, np.float32), np.asarray(labels, np.int32)
    b = len(labels)
    if b > batch_size or len(images) != b:
        raise ValueError(f"batch of {len(images)} images / {b} labels does not fit batch_size {batch_size}")
    mask = np.arange(batch_size) < b
    if b < batch_size:
        images = np.concatenate([images, np.zeros((batch_size - b,) + images.shape[1:], np.float32)])
        labels = np.concatenate([labels, np.zeros(batch_size - b, np.int32)])
    return images, labels, mask


def evaluate_classifier(apply_fn, source, *, batch_size: int = 64, limit: int | None = None,
                        progress: bool = True, mesh=None, subset: str = "balanced") -> dict:
    """Top-1 / top-5 accuracy of ``apply_fn`` over ``limit`` images of ``source`` (all when None):
    stratified by label (``subset="balanced"``, :func:`cfws_jax.data.source.subset_indices`) or the
    source's first images (``"first"``).

    ``mesh``: a :func:`cfws_jax.parallel.local_mesh` (or a device count) to run data parallel:
    every batch (``batch_size`` rounded up to a multiple of the device count) is sharded over
    the devices, a ``jax.tree_util.Partial``'s arrays are replicated; counts are exact integers
    reduced over the devices, padding rows masked out.

    Returns ``{"top1": float, "top5": float | None, "images": int, "subset": str}`` with
    accuracies as fractions in [0, 1] and ``subset`` one line saying which images were used. ``top5`` is None when the model has fewer than 5 classes. A ValueError is raised
    when the source has more classes than the model outputs or holds no images.
    """
    total = source.count(limit)
    if source.num_classes == 0:
        raise ValueError(f"{source.spec} [{source.split}]: the images are unlabeled (no class "
                         "sub-folders); evaluation needs one sub-folder per class")
    if total == 0:
        raise ValueError(f"{source.spec} [{source.split}]: no images to evaluate")
    put = lambda *a: a  # noqa: E731
    if mesh is not None:
        from cfws_jax import parallel

        mesh = parallel.local_mesh(mesh)
        batch_size = parallel.padded_size(batch_size, mesh)
        if isinstance(apply_fn, jax.tree_util.Partial):
            apply_fn = parallel.replicate(apply_fn, mesh)
        put = lambda *a: jax.device_put(a, parallel.batch_sharding(mesh))  # noqa: E731
    step = make_eval_step(apply_fn)
    bar = Progress(total=total, desc="eval", unit="img", disable=not progress)
    counts = {"c1": 0, "c5": 0, "n": 0}
    num_logits = None

    def collect(out, b):
        nonlocal num_logits
        c1, c5, c = (int(v) for v in out)  # blocks on that batch only
        if num_logits is None:
            num_logits = c
            if source.num_classes > c:
                raise ValueError(f"{source.spec} has {source.num_classes} classes but the model "
                                 f"outputs {c} logits")
        counts["c1"] += c1
        counts["c5"] += c5
        counts["n"] += b
        bar.set_postfix(f"top1 {100.0 * counts['c1'] / counts['n']:.2f}%")
        bar.update(b)

    pending = None
    try:
        for images, labels in source.iter_batches(batch_size, limit, subset):
            out = step(*put(*pad_batch(images, labels, batch_size)))  # dispatched asynchronously
            if pending is not None:
                collect(*pending)  # the previous batch, while this one runs
            pending = (out, len(labels))
        if pending is not None:
            collect(*pending)
    finally:
        bar.close()
    n = counts["n"]
    return {"top1": counts["c1"] / n, "top5": counts["c5"] / n if num_logits >= 5 else None,
            "images": n, "subset": subset_description(source, limit, subset)}


def subset_description(source, limit: int | None, subset: str = "balanced") -> str:
    """``"1000 of 10000 test images, 100 per class"``: which images ``limit`` / ``subset`` select."""
    from cfws_jax.data.source import describe_subset, excluded_note, num_excluded

    labels = source.known_labels() if hasattr(source, "known_labels") else None
    split = getattr(source, "split", None)
    return describe_subset(source.subset(limit, subset), source.num_images, labels,
                           f"{split} images" if split else "images", num_excluded(source)) + excluded_note(source)

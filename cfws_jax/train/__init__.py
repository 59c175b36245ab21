"""YOLOv6 (v2.0 / v3.0 head) detection training in JAX: pure functions of arrays and pytrees.

* :mod:`~cfws_jax.train.boxes`   -- box conversions, IoU / GIoU (pairwise and elementwise);
* :mod:`~cfws_jax.train.anchors` -- per-level pred maps -> flat anchor rows (points, strides, boxes);
* :mod:`~cfws_jax.train.assign`  -- the task-aligned assigner (TOOD), batched and jittable;
* :mod:`~cfws_jax.train.losses`  -- varifocal loss, GIoU box loss, DFL, the weighted total;
* :mod:`~cfws_jax.train.optim`   -- SGD + Nesterov, warm-up + cosine, kernel-only decay, weight EMA;
* :mod:`~cfws_jax.train.augment` -- host-side (NumPy, seeded) flip / scale / HSV jitter with boxes;
* :mod:`~cfws_jax.train.lowering` -- QConvs through the matmul lowering (fast kernel grads on CPU);
* :mod:`~cfws_jax.train.step`    -- the jitted train step (BatchNorm in training mode) and EMA apply.

Facts come from the papers (YOLOv6 arXiv 2209.02976 / 2301.05586, TOOD, VarifocalNet, GFL), not
from the GPL reference code.
"""

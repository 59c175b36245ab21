"""Export to exchange formats: ONNX with QuantizeLinear / DequantizeLinear (QDQ) nodes.

``export_onnx(qm, float_export=False, image_size=None) -> onnx.ModelProto`` and
``float_onnx(arch, variables)``, for RepVGG / MobileOne classifiers and YOLOv6 detectors (decoded
``outputs [batch, N, 5 + classes]``); see :mod:`cfws_jax.export.onnx_qdq`. Needs the ``onnx`` package (``pip install 'cfws-jax[export]'``).
"""

from cfws_jax.export.onnx_qdq import export_onnx, float_onnx, input_normalization

__all__ = ["export_onnx", "float_onnx", "input_normalization"]

"""Export to exchange formats: ONNX with QuantizeLinear / DequantizeLinear (QDQ) nodes.

``export_onnx(qm, float_export=False) -> onnx.ModelProto`` and ``float_onnx(arch, variables)``;
see :mod:`cfws_jax.export.onnx_qdq`. Needs the ``onnx`` package (``pip install 'cfws-jax[export]'``).
"""

from cfws_jax.export.onnx_qdq import export_onnx, float_onnx, input_normalization

__all__ = ["export_onnx", "float_onnx", "input_normalization"]

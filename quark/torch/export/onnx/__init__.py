"""ONNX export with QuantizeLinear / DequantizeLinear (opset 21)."""

"""The ONNX query-encoder artifact's layout, shared by the exporter and the runtime (no torch import)."""

ONNX_KIND = "onnx-query-encoder"
ONNX_FILE = "model.onnx"

"""ONNX export of a plain model, traced from minisft's own graph (exporter.py, through the
operators of operators.py into graph.py's symbolic-shape graph), and running the file with
onnxruntime (runtime.py). Needs the export extra (onnx, onnxruntime)."""

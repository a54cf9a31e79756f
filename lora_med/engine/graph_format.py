"""The decode-graph folder's format, shared by the exporter that writes it and the engine that reads it.

One declaration of each name and threshold, so that a writer and a reader cannot drift apart.
"""

GRAPH_FILE = "model.onnx"  # also the name ORTModelForCausalLM.from_pretrained(dir) finds without help
ENGINE_FILE = "engine.json"  # the decode graph's description, beside GRAPH_FILE
EXTERNAL_DATA_SUFFIX = ".data"  # a graph's external weights: model.onnx -> model.onnx.data (onnxruntime's own choice)
# Protobuf refuses messages of 2 GiB or more; weights move to the external data file a margin below that.
EXTERNAL_DATA_BYTES = 1_800_000_000

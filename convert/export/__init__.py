"""Export: the target registry (one module per target), the traced graph, int8 quantization with its
repair, equalization, verification against Keras, and the manifest."""

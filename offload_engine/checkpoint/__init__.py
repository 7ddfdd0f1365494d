"""Files on disk: the quantized format (manifest + safetensors), sources, conversion.
Stage 3; may use model/, kernels/, quant/ and the package root.
"""

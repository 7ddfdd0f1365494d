"""Quantization math: the one packing layout, quantize/dequantize as pure functions.
Stage 1 of the data path; imports only the package root (errors, units).
"""

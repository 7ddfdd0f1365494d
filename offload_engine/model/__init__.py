"""What a transformers model looks like: its linears, roles and shapes, on an empty skeleton.
Stage 2; may use quant/ and the package root, never a file on disk.
"""

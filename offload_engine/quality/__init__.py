"""How much quantization costs: perplexity, KL and agreement against a reference.
Stage 7; may use decode/ and everything below it.
"""

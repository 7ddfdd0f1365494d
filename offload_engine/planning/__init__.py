"""Sizes, cache policy and hardware profiles: what fits where, and how fast it should run.
Stage 4; may use checkpoint/ and everything below it, never the runtime.
"""

"""Text generation on a loaded engine: prompts, sampling, streaming, measured stats.
Stage 6; may use runtime/ and everything below it.
"""

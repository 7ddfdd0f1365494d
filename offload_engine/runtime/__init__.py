"""Host store, prefetch worker, device cache, cache-backed Linear, model patching, load.
Stage 5; may use planning/ and everything below it.
"""

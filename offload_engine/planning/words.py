"""The words the engine flags accept, without torch: the CLI builds its parsers from them.

:mod:`.settings`, :mod:`.policy` and :mod:`.sizes` use the same tuples; they live
here so that ``offload-engine --help`` never imports torch.
"""

POLICIES = ("static", "lru")  # cache policies, see policy.py
EXPERT_POLICIES = ("lfu", "lru")  # mixture-of-experts expert cache policies, see expert_policy.py
ON_OFF = ("on", "off")  # --expert-prefetch
# how a cached weight is held, see sizes.py; "prepacked" (CPU only): packed plus the CPU
# int4 kernel's own form of it, built when the weight is loaded
CACHE_FORMATS = ("packed", "dequantized", "prepacked")
DTYPE_NAMES = ("float32", "bfloat16", "float16")  # compute dtypes, see settings.py
UNBOUNDED = ("unbounded", "none", "inf", "all")  # --gpu-budget words for "no limit"
EMBEDDING_PLACES = ("device", "host")  # where the token embedding table lives
# where decoder layer parts run (placement.py): auto (the planner's faster prediction),
# stream (all through the device cache), cpu (all on the CPU), mlp-cpu (MLPs on the CPU),
# experts-cpu (mixture-of-experts: experts not in the device's slots computed on the CPU)
PLACEMENTS = ("auto", "stream", "cpu", "mlp-cpu", "experts-cpu")

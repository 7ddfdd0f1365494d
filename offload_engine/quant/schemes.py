"""The scheme and group-size vocabulary, without torch.

The command line builds its parsers from these names; keeping them apart from
:mod:`.layout` (which needs torch) lets ``offload-engine --help`` start in a blink.
"""

SCHEMES = ("int4", "int4-asym", "int8")
GROUP_SIZES = (32, 64, 128, 256)
# The defaults come from measured quality (docs/quality.md): on SmolLM2 the zero point
# halved the KL divergence of int4 g128 (0.34 vs 0.61 nats) for 1.5% more bytes on a 32B model.
DEFAULT_SCHEME = "int4-asym"
DEFAULT_GROUP_SIZE = 128

# Quantization methods (checkpoint/methods.py) and awq's calibration defaults
# (checkpoint/calibration_data.py); the CLI reads them from here to keep --help light.
METHODS = ("rtn", "clip", "awq", "gptq", "awq-gptq")
# `auto` (the CLI's default) picks awq where it applies and is affordable, else rtn
# (checkpoint/methods.py, choose_method): on SmolLM2 at int4-asym g128 awq's mean KL is
# 0.154 against round-to-nearest's 0.340 (docs/quality.md), but awq folds only some
# architectures and calibrating on a CPU takes minutes even for a 135M model.
AUTO_METHOD = "auto"
DEFAULT_METHOD = AUTO_METHOD
DEFAULT_CALIB_SAMPLES = 16  # sequences of calibration text
DEFAULT_CALIB_SEQ_LEN = 512  # tokens per sequence

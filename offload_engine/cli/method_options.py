"""`quantize`'s method flags: --method and the calibration settings of awq and gptq."""

from __future__ import annotations

from pathlib import Path

from ..quant.schemes import (
    AUTO_METHOD,
    DEFAULT_CALIB_SAMPLES,
    DEFAULT_CALIB_SEQ_LEN,
    DEFAULT_METHOD,
    METHODS,
)


def add_method_args(parser, calibration_device: bool = True) -> None:
    """The method flags; ``calibration_device`` adds --device (run/chat/serve calibrate on
    the engine's --device instead)."""
    group = parser.add_argument_group("method (see docs/quality.md)")
    group.add_argument("--method", choices=(AUTO_METHOD,) + METHODS, default=DEFAULT_METHOD,
                       help="auto: awq where its scales fold and a GPU calibrates (or the "
                            "model is small), else rtn, with a note saying which and why; "
                            "rtn: round to nearest; clip: per-group range search, no data; "
                            "awq: activation-aware scales from calibration text; "
                            "gptq: error-compensating rounding from calibration text; "
                            f"awq-gptq: both, AWQ's scales first (default {DEFAULT_METHOD})")
    group.add_argument("--calib-file", type=Path, default=None, metavar="FILE",
                       help="calibrated methods: UTF-8 calibration text (default: the "
                            "second half of CPython's pydoc_data.topics, which `eval` never "
                            "scores)")
    group.add_argument("--calib-samples", type=int, default=DEFAULT_CALIB_SAMPLES,
                       metavar="N", help="calibrated methods: calibration sequences "
                                         f"(default {DEFAULT_CALIB_SAMPLES})")
    group.add_argument("--calib-seq-len", type=int, default=DEFAULT_CALIB_SEQ_LEN,
                       metavar="N", help="calibrated methods: tokens per calibration sequence "
                                         f"(default {DEFAULT_CALIB_SEQ_LEN})")
    if calibration_device:
        group.add_argument("--device", default="auto", metavar="DEV",
                           help="calibrated methods: where calibration runs, cpu or cuda; "
                                "auto: cuda when a GPU is visible (default auto)")


def method_from_args(args, device: str | None = None):
    """The MethodSettings the flags describe; calibration runs on ``device`` (default:
    --device), where auto means cuda when a GPU is visible."""
    import torch

    from ..checkpoint.calibrate import CalibrationSettings
    from ..checkpoint.calibration_data import CalibrationData
    from ..checkpoint.methods import MethodSettings

    device = device or args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    data = CalibrationData(args.calib_samples, args.calib_seq_len, args.calib_file)
    return MethodSettings(args.method, calibration=CalibrationSettings(data, device))

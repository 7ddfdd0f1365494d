"""`quantize`'s method flags: --method and the calibration settings of awq and gptq."""

from __future__ import annotations

from pathlib import Path

from ..quant.schemes import DEFAULT_CALIB_SAMPLES, DEFAULT_CALIB_SEQ_LEN, DEFAULT_METHOD, METHODS


def add_method_args(parser) -> None:
    group = parser.add_argument_group("method (see docs/quality.md)")
    group.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD,
                       help="rtn: round to nearest; clip: per-group range search, no data; "
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
    group.add_argument("--device", default="cpu", metavar="DEV",
                       help="calibrated methods: where calibration runs, cpu or cuda (default cpu)")


def method_from_args(args):
    from ..checkpoint.calibrate import CalibrationSettings
    from ..checkpoint.calibration_data import CalibrationData
    from ..checkpoint.methods import MethodSettings

    data = CalibrationData(args.calib_samples, args.calib_seq_len, args.calib_file)
    return MethodSettings(args.method, calibration=CalibrationSettings(data, args.device))

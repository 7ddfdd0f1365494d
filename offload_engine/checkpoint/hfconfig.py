"""Reading a model's config.json and checking its tokenizer files, with one-line errors.

transformers reports a malformed config.json with a traceback deep inside its own code,
or accepts a string where a size belongs and fails later in model building. These
checks run first and name the file, the field and what to do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Tuple, Type

from ..errors import FormatError, OffloadError

# Fields a decoder-only config holds as sizes; a string or float here breaks model building.
INT_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "vocab_size", "max_position_embeddings", "head_dim")
FLOAT_FIELDS = ("rms_norm_eps", "layer_norm_eps", "rope_theta", "initializer_range")
# Where quantizers record their settings when config.json holds no quantization_config:
# AutoGPTQ and GPTQModel write quantize_config.json, AutoAWQ before its transformers
# integration quant_config.json. Each file implies its method when it names none.
QUANT_SETTINGS_FILES = (("quantize_config.json", "gptq"), ("quant_config.json", "awq"))
# A directory needs one of these for AutoTokenizer to build a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def read_hf_config(directory: Path, error: Type[OffloadError] = FormatError,
                   fix: str = "re-convert the model or restore the file"):
    """The transformers config of DIRECTORY/config.json; ERROR(...) names what is wrong."""
    if not (Path(directory) / "config.json").is_file():
        raise error(f"{directory}: no config.json; {fix}")
    return read_config_file(Path(directory) / "config.json", error, fix)


def read_config_file(path: Path, error: Type[OffloadError], fix: str):
    """The transformers config in the config.json at PATH, checked before transformers reads it."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path}: cannot read it ({exc}); {fix}") from exc
    except json.JSONDecodeError as exc:
        raise error(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno} "
                    f"({exc.msg}); {fix}") from exc
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, found {type(data).__name__}; {fix}")
    check_field_types(data, path, error, fix)
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError, StrictDataclassError) as exc:
        detail = " ".join(str(exc).split())  # one line, whatever transformers wrote
        raise error(f"{path}: transformers cannot read this config ({detail}); {fix}") from exc


def quantization_settings(directory: Path) -> Tuple[dict, str]:
    """(settings, the file they are in): config.json's ``quantization_config``, else a
    quantizer's own settings file with ``quant_method`` filled in; ({}, "") when the
    directory states none (an unreadable file states none: the source that reads the
    weights reports what is wrong with them)."""
    directory = Path(directory)
    quantization = _json_object(directory / "config.json").get("quantization_config")
    if isinstance(quantization, dict):
        return quantization, "config.json"
    for name, method in QUANT_SETTINGS_FILES:
        settings = _json_object(directory / name)
        if settings:
            return {"quant_method": method, **settings}, name
    return {}, ""


def _json_object(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def check_field_types(data: dict, path: Path, error: Type[OffloadError], fix: str) -> None:
    """Sizes must be integers and epsilons numbers (JSON true/false are neither)."""
    for key in INT_FIELDS:
        value = data.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise error(f"{path}: {key!r} is {value!r} ({type(value).__name__}); it must be a "
                        f"whole number; {fix}")
    for key in FLOAT_FIELDS:
        value = data.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise error(f"{path}: {key!r} is {value!r} ({type(value).__name__}); it must be a "
                        f"number; {fix}")


def check_tokenizer_files(directory: Path) -> None:
    """Raise FormatError when DIRECTORY has none of the files a tokenizer is built from."""
    if not any((Path(directory) / name).is_file() for name in TOKENIZER_FILES):
        raise FormatError(
            f"{directory}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); copy them from "
            "the source model into this directory, or re-convert the model")

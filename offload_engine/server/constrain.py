"""response_format: JSON output enforced while decoding, token by token, with xgrammar.

xgrammar is what vLLM and SGLang use by default for structured output: it compiles a JSON
schema against the tokenizer's vocabulary once, then per step fills a bitmask of the
tokens the grammar allows (microseconds on CPU), which is applied to one row of logits.
It is an optional dependency (the ``json`` extra), imported only when a request asks.
"""

from __future__ import annotations

import importlib.util
import json
import re
import threading
from typing import Iterable, Optional

import torch

from .schemas import ApiError


class Constraint:
    """One request's grammar state: masks its logits, follows its tokens."""

    def __init__(self, matcher, vocab_size: int, xgr):
        self._xgr = xgr
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """Row (V,) with every token the grammar forbids at -inf (a new tensor)."""
        self.matcher.fill_next_token_bitmask(self.bitmask)
        masked = logits.float().clone().view(1, -1)
        self._xgr.apply_token_bitmask_inplace(masked, self.bitmask.to(masked.device),
                                              vocab_size=self.vocab_size)
        return masked.view(-1)

    def accept(self, token: int) -> None:
        if not self.matcher.accept_token(token):  # the mask allowed it: a bug, not the user
            raise RuntimeError(f"the grammar rejected token {token} it had allowed")

    @property
    def finished(self) -> bool:
        return self.matcher.is_terminated()


class Grammars:
    """Compiles response formats for one tokenizer; the vocabulary is read once, lazily."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: Iterable[int]):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_ids = sorted(stop_ids)
        self._lock = threading.Lock()
        self._compiler = None

    def _compiler_for(self):
        if importlib.util.find_spec("xgrammar") is None:
            raise ApiError(400, "response_format needs the xgrammar package on the server: "
                                "pip install 'offload-engine[json]'", param="response_format")
        import xgrammar as xgr

        with self._lock:
            if self._compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(
                    self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_ids)
                self._compiler = xgr.GrammarCompiler(info)
        return self._compiler, xgr

    def constraint(self, response_format) -> Optional[Constraint]:
        """The constraint for a request's response_format; None for plain text."""
        if response_format is None or response_format.type == "text":
            return None
        compiler, xgr = self._compiler_for()
        if response_format.type == "json_object":
            schema = {"type": "object"}  # any object; compact, so no endless whitespace
        else:
            schema = response_format.json_schema.schema_
        try:
            compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
        except Exception as exc:  # noqa: BLE001 - xgrammar raises plain errors for bad schemas
            raise ApiError(400, f"response_format.json_schema.schema cannot be used: {exc}",
                           param="response_format.json_schema.schema") from None
        return self._constraint(compiled, xgr)

    def forced_tool_call(self, schema: dict, hermes: bool) -> Constraint:
        """A reply that must be one call matching ``schema``: wrapped in <tool_call> tags for
        Hermes-style templates, bare JSON for Llama 3.x."""
        compiler, xgr = self._compiler_for()
        try:
            grammar = xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False)
        except Exception as exc:  # noqa: BLE001 - xgrammar raises plain errors for bad schemas
            raise ApiError(400, f"a tool's parameters schema cannot be used: "
                                f"{_xgrammar_reason(exc)}", param="tools") from None
        if hermes:
            grammar = xgr.Grammar.concat(xgr.Grammar.from_ebnf('root ::= "<tool_call>\\n"'),
                                         grammar,
                                         xgr.Grammar.from_ebnf('root ::= "\\n</tool_call>"'))
        return self._constraint(compiler.compile_grammar(grammar), xgr)

    def _constraint(self, compiled, xgr) -> Constraint:
        matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=self.stop_ids or None,
                                     terminate_without_stop_token=not self.stop_ids)
        return Constraint(matcher, self.vocab_size, xgr)


JSON_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}
_XGR_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")  # "[11:29:59] /project/cpp/x.cc:5082: "


def _xgrammar_reason(exc: Exception) -> str:
    return _XGR_PREFIX.sub("", str(exc).strip())


def _basic_problem(schema, where: str = "") -> Optional[str]:
    """What is wrong with a JSON schema's structure (types, properties, required), if
    anything: the check when xgrammar is not installed."""
    if not isinstance(schema, dict):
        return f"{where or 'the schema'} must be an object"
    types = schema.get("type", [])
    for name in types if isinstance(types, list) else [types]:
        if name not in JSON_TYPES:
            return f"unsupported type {name!r}{' at ' + where if where else ''}"
    properties = schema.get("properties", {})
    if not isinstance(properties, dict):
        return "properties must be an object"
    if not isinstance(schema.get("required", []), list):
        return "required must be an array"
    for key, sub in properties.items():
        problem = _basic_problem(sub, f"{where}.{key}" if where else key)
        if problem:
            return problem
    return None


def schema_problem(schema: dict) -> Optional[str]:
    """Why ``schema`` cannot be used as a JSON schema, or None: the same check a forced
    call's grammar makes (xgrammar), else a structural one."""
    if importlib.util.find_spec("xgrammar") is None:
        return _basic_problem(schema)
    import xgrammar as xgr

    try:
        xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False)
    except Exception as exc:  # noqa: BLE001 - xgrammar raises plain errors for bad schemas
        return _xgrammar_reason(exc)
    return None


def check_tool_schemas(tools: list) -> None:
    """400 naming the first tool whose parameters are not a usable JSON schema: refused
    whatever tool_choice is, not only when a call is forced."""
    for index, tool in enumerate(tools):
        parameters = tool.function.parameters
        problem = None if parameters is None else schema_problem(parameters)
        if problem:
            raise ApiError(400, f"tools[{index}] ({tool.function.name}): parameters is not a "
                                f"usable JSON schema: {problem}",
                           param=f"tools.{index}.function.parameters")

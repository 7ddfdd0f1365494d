"""One sampling path for the CLI, the Python API and the server, on transformers' processors.

``SamplingSettings`` says how the next token is chosen (temperature, top-k, top-p, min-p,
repetition / presence / frequency penalties). Its defaults are the model's own
``generation_config.json``, as transformers reads it (a model that says nothing, or
``do_sample: false``, decodes greedily); flags and request fields override them.
``logits_processors`` turns the settings into a ``LogitsProcessorList`` of transformers'
own warpers plus one small processor for OpenAI's penalties, which transformers lacks.
``engine.generate`` hands that list to transformers' ``generate``; the server's scheduler
runs the same list over each row's logits and draws with the request's own generator.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import List, Optional, Tuple

import torch
from transformers.generation.logits_process import (
    LogitsProcessor,
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ..errors import ConfigError

PENALTY_LIMIT = 2.0  # OpenAI's range for presence and frequency penalties: [-2, 2]


@dataclass(frozen=True)
class SamplingSettings:
    """How the next token is chosen; the neutral value of each field switches it off."""

    temperature: float = 1.0  # 0 is greedy: always the likeliest token (after penalties)
    top_p: float = 1.0  # nucleus: keep the likeliest tokens holding this much probability
    top_k: int = 0  # keep the k likeliest tokens; 0 keeps all
    min_p: float = 0.0  # drop tokens below min_p x the likeliest token's probability
    repetition_penalty: float = 1.0  # CTRL's: logits of tokens in prompt or reply / by this
    presence_penalty: float = 0.0  # OpenAI's: subtracted once per token the reply holds
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per time the reply holds it

    def __post_init__(self) -> None:
        checks = (
            ("--temperature", self.temperature, self.temperature >= 0, ">= 0"),
            ("--top-p", self.top_p, 0 < self.top_p <= 1, "in (0, 1]"),
            ("--top-k", self.top_k, self.top_k >= 0 and float(self.top_k).is_integer(),
             "a whole number >= 0"),
            ("--min-p", self.min_p, 0 <= self.min_p <= 1, "in [0, 1]"),
            ("--repeat-penalty", self.repetition_penalty, self.repetition_penalty > 0, "> 0"),
            ("--presence-penalty", self.presence_penalty,
             abs(self.presence_penalty) <= PENALTY_LIMIT, "in [-2, 2]"),
            ("--frequency-penalty", self.frequency_penalty,
             abs(self.frequency_penalty) <= PENALTY_LIMIT, "in [-2, 2]"),
        )
        for flag, value, ok, wanted in checks:
            if not ok:
                raise ConfigError(f"{flag} must be {wanted}, got {value}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def as_dict(self) -> dict:
        return asdict(self)


# generation_config.json keys read as defaults, and the SamplingSettings field each sets
_CONFIG_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def model_defaults(generation_config) -> SamplingSettings:
    """The settings a model's generation config asks for, as transformers would apply them.

    Sampling only when it says ``do_sample: true`` (transformers' default is greedy); then
    its temperature, top_p, top_k and min_p; repetition_penalty applies either way. Keys it
    does not set stay neutral (transformers' implicit top_k 50 is not adopted: it is no
    choice of the model's, and OpenAI clients expect no cut-off they did not ask for).
    """
    if generation_config is None:
        return SamplingSettings(temperature=0.0)
    found = {name: getattr(generation_config, name, None) for name in _CONFIG_FIELDS}
    found = {name: value for name, value in found.items() if value is not None}
    if not getattr(generation_config, "do_sample", False):
        found = {"repetition_penalty": found.get("repetition_penalty", 1.0), "temperature": 0.0}
    try:
        return SamplingSettings(**found)
    except ConfigError as exc:
        raise ConfigError(f"the model's generation_config.json: {exc}; fix the file or give "
                          "the setting explicitly") from None


def resolve(defaults: SamplingSettings, greedy: bool = False, **given) -> SamplingSettings:
    """``defaults`` (the model's) with every setting given (not None) on top; ``greedy``
    wins."""
    settings = replace(defaults,
                       **{name: value for name, value in given.items() if value is not None})
    return replace(settings, temperature=0.0) if greedy else settings


class PresenceFrequencyPenalty(LogitsProcessor):
    """OpenAI's presence and frequency penalties over the tokens generated so far (as vLLM
    does: the prompt, the first ``prompt_length`` ids, is not counted)."""

    def __init__(self, presence: float, frequency: float, prompt_length: int):
        self.presence, self.frequency = presence, frequency
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        generated = input_ids[:, self.prompt_length:]  # (B, new)
        if generated.shape[1] == 0:
            return scores
        vocab = scores.shape[-1]
        counts = torch.zeros((scores.shape[0], vocab + 1), dtype=scores.dtype,
                             device=scores.device)  # the extra column absorbs ids >= vocab
        counts.scatter_add_(1, generated.clamp(max=vocab),
                            torch.ones_like(generated, dtype=scores.dtype))
        counts = counts[:, :vocab]  # (B, V)
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


def logits_processors(settings: SamplingSettings, prompt_length: int) -> LogitsProcessorList:
    """Penalties first, then (when sampling) temperature, top-k, top-p and min-p, in
    transformers' order; min-p thus sees the tempered distribution, as in llama.cpp."""
    processors = LogitsProcessorList()
    if settings.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(float(settings.repetition_penalty)))
    if settings.presence_penalty or settings.frequency_penalty:
        processors.append(PresenceFrequencyPenalty(settings.presence_penalty,
                                                   settings.frequency_penalty, prompt_length))
    if settings.greedy:
        return processors
    if settings.temperature != 1.0:
        processors.append(TemperatureLogitsWarper(float(settings.temperature)))
    if settings.top_k:
        processors.append(TopKLogitsWarper(int(settings.top_k)))
    if settings.top_p < 1.0:
        processors.append(TopPLogitsWarper(float(settings.top_p)))
    if settings.min_p:
        processors.append(MinPLogitsWarper(float(settings.min_p)))
    return processors


def needs_ids(settings: SamplingSettings) -> bool:
    """Whether the processors read the token ids (the penalties do; the warpers do not)."""
    return (settings.repetition_penalty != 1.0 or bool(settings.presence_penalty)
            or bool(settings.frequency_penalty))


def hf_generate_args(settings: SamplingSettings, generation_config) -> dict:
    """Arguments for transformers' ``generate`` when ``logits_processors`` does the work:
    the model's own warpers and penalty are set neutral so nothing is applied twice."""
    if settings.greedy:
        # sampling values are unused without do_sample; None keeps transformers quiet
        args = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    else:
        args = {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0}
        if getattr(generation_config, "min_p", None) is not None:
            args["min_p"] = 0.0  # None would mean "the model's"
    args["repetition_penalty"] = 1.0
    return args


def make_generator(settings: SamplingSettings, seed: Optional[int],
                   device: torch.device) -> Optional[torch.Generator]:
    """A generator per request, so batching with others never changes a seeded result."""
    if settings.greedy:
        return None
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


class Sampler:
    """Chooses one sequence's tokens from rows of logits, one step at a time (the server)."""

    def __init__(self, settings: SamplingSettings, prompt_ids: List[int], seed: Optional[int],
                 device: torch.device):
        self.settings = settings
        self.prompt_ids = prompt_ids
        self.processors = logits_processors(settings, len(prompt_ids))
        self.generator = make_generator(settings, seed, device)

    def scores(self, logits: torch.Tensor, generated: List[int]) -> torch.Tensor:
        """The processed scores (1, V) for one row of logits (V,)."""
        scores = logits.float()[None]  # (1, V), float32 as transformers' generate scores
        if not self.processors:
            return scores
        ids = (torch.tensor([self.prompt_ids + generated], device=logits.device)
               if needs_ids(self.settings) else scores.new_zeros((1, 0), dtype=torch.long))
        return self.processors(ids, scores)

    def choose(self, scores: torch.Tensor) -> int:
        """The next token from processed scores (1, V): argmax when greedy, else a draw."""
        if self.settings.greedy:
            return int(torch.argmax(scores[0]))
        probs = torch.softmax(scores[0], dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def _held_back(text: str, stops: List[str]) -> int:
    """Characters at the end of ``text`` that could be the start of a stop string."""
    held = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:size]):
                held = size
                break
    return held


class TextTracker:
    """Decodes a reply's tokens and hands out only text that is final.

    Text is held back while it ends in an incomplete UTF-8 character or could be the start
    of a stop string; a stop string that appears ends the reply and is not returned.
    """

    def __init__(self, tokenizer, stops: List[str]):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.emitted = ""  # text already handed out

    def update(self, token_ids: List[int], final: bool) -> Tuple[str, bool]:
        """The new text to hand out, and whether a stop string was found."""
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            return self._hand_out(text[:cut]), True
        if not final:
            if text.endswith("\ufffd"):
                return "", False
            text = text[:len(text) - _held_back(text, self.stops)]
        return self._hand_out(text), False

    def _hand_out(self, text: str) -> str:
        if not text.startswith(self.emitted):
            # a later token changed how earlier ones decode; keep what was already sent
            text = self.emitted + text[len(self.emitted):]
        delta = text[len(self.emitted):]
        self.emitted = text
        return delta

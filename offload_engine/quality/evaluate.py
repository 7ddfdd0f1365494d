"""Quality evaluation: what quantization costs, measured against the unquantized model.

Both models score the same token windows of the same text (tokenised once, with the
quantized model's tokenizer). From the two next-token distributions at every position
we report the perplexity of each, the relative perplexity increase, the mean
KL(reference || quantized), the top-1 agreement, and, from a fixed prompt, how many
greedy tokens the two produce before they first differ.

The reference always runs with transformers in float32 on the CPU; the quantized model
runs through the engine on whatever device the engine was loaded on.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional

import torch
from tqdm.auto import tqdm

from ..checkpoint.calibration_data import pydoc_topics_text
from ..checkpoint.format import MANIFEST_NAME
from ..errors import ConfigError, SourceError
from ..model.architecture import text_config
from ..model.cache_arg import cache_kwargs, output_cache

logger = logging.getLogger(__name__)

# The default text: these pydoc topics, in sorted key order, joined by blank lines.
# Sorted keys make the slice independent of dict order; the text ships with CPython.
DEFAULT_TEXT_CHARS_PER_TOKEN = 8  # generous; we tokenise only a prefix of the long text
LOGITS_BUDGET_BYTES = 256 * 1024**2  # float32 logits of one batch of windows, per model


@dataclass
class EvalSettings:
    """What to score and how."""

    tokens: int = 2048  # score the first N tokens of the text
    window: int = 512  # tokens per window; capped at the model's context
    greedy_tokens: int = 64  # greedy tokens generated when looking for the first divergence
    prompt_tokens: int = 32  # the greedy prompt: the first tokens of the text

    def __post_init__(self) -> None:
        if self.tokens < 2:
            raise ConfigError(f"--tokens must be at least 2, got {self.tokens}")
        if self.window < 2:
            raise ConfigError(f"the window must hold at least 2 tokens, got {self.window}")
        if self.greedy_tokens < 0:
            raise ConfigError(f"--greedy-tokens must be 0 or more, got {self.greedy_tokens}")
        if self.prompt_tokens < 1:
            raise ConfigError(f"the greedy prompt needs a token, got {self.prompt_tokens}")


@dataclass
class EvalReport:
    """The numbers one evaluation produced."""

    model: str  # the quantized directory
    reference: str  # the reference checkpoint
    scheme: str
    group_size: int
    linear_bytes_per_param: float  # stored bytes of the quantized weights / their parameters
    tokens: int  # tokens of text scored
    predictions: int  # next-token predictions compared (tokens minus one per window)
    windows: int
    window: int  # tokens per window
    perplexity: float  # of the quantized model
    reference_perplexity: float
    perplexity_increase: float  # perplexity / reference_perplexity - 1
    mean_kl: float  # mean KL(reference || quantized) of next-token distributions, nats
    top1_agreement: float  # share of positions where both likeliest tokens agree
    greedy_matching: int  # greedy tokens that agree before the first difference
    greedy_tokens: int  # greedy tokens asked for (matching == this: no divergence)
    device: str  # where the quantized model ran
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)

    def render(self) -> str:
        rows = [
            ("model", f"{self.model} ({self.scheme}, group {self.group_size}, "
                      f"{self.linear_bytes_per_param:.4f} bytes/param)"),
            ("reference", self.reference),
            ("text", f"{self.tokens} tokens, {self.windows} window(s) of up to {self.window}, "
                     f"{self.predictions} predictions"),
            ("perplexity", f"{self.perplexity:.4f} (reference {self.reference_perplexity:.4f}, "
                           f"{self.perplexity_increase:+.2%})"),
            ("mean KL", f"{self.mean_kl:.6f} nats/token"),
            ("top-1 agreement", f"{self.top1_agreement:.2%}"),
            ("greedy", f"{self.greedy_matching} of {self.greedy_tokens} tokens identical "
                       "before the first difference"),
            ("time", f"{self.seconds:.1f} s on {self.device}"),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


# ----- inputs ---------------------------------------------------------------------------

def default_text() -> str:
    # One definition shared with calibration, which reads only the text's second half.
    return pydoc_topics_text()


def read_text(path: Optional[Path]) -> Optional[str]:
    """The text of --text FILE, or None for the default text."""
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--text {path}: no such file")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--text {path}: cannot read it as UTF-8 text ({exc})") from exc


def tokenize(tokenizer, text: Optional[str], tokens: int) -> torch.Tensor:
    """The first ``tokens`` token ids of the text, (1, T); the default text if None.

    Only a prefix of the (long) default text is tokenised; it is long enough that the
    first ``tokens`` ids never depend on where the prefix was cut.
    """
    if text is None:
        full = default_text()
        text = full[: max(4096, tokens * DEFAULT_TEXT_CHARS_PER_TOKEN)]
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= tokens:
            ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = ids[:tokens]
    if len(ids) < 2:
        raise ConfigError(f"the text has {len(ids)} token(s); at least 2 are needed to score "
                          "a next-token prediction: pass a longer --text")
    return torch.tensor([ids], dtype=torch.long)


def load_reference(src, progress: bool = True) -> torch.nn.Module:
    """The unquantized model (safetensors directory or .gguf), float32 on the CPU;
    ``progress`` False hides transformers' own loading bars too."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    folder, gguf_file = reference_location(Path(src))
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    already_off = not hf_logging.is_progress_bar_enabled()
    try:
        if not progress:
            hf_logging.disable_progress_bar()
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)
    except (ValueError, OSError, KeyError) as exc:
        raise SourceError(f"--reference {src}: cannot load it as a transformers model "
                          f"({exc})") from exc
    finally:
        if not progress and not already_off:
            hf_logging.enable_progress_bar()
    model.eval()
    model.reference_path = str(src)  # for the report
    return model


def reference_location(src: Path):
    """(folder, gguf file name or None), with a SourceError for anything else; cheap."""
    if not src.exists():
        raise SourceError(f"--reference {src}: no such file or directory")
    if src.is_file():
        if src.suffix.lower() != ".gguf":
            raise SourceError(f"--reference {src}: a file reference must be a .gguf; otherwise "
                              "pass a Hugging Face model directory")
        return str(src.parent), src.name
    if (src / MANIFEST_NAME).is_file():
        raise SourceError(f"--reference {src}: this is a quantized directory; pass the "
                          "unquantized source it was converted from")
    ggufs = sorted(src.glob("*.gguf"))
    has_safetensors = any(src.glob("*.safetensors"))
    if not has_safetensors and len(ggufs) == 1:
        return str(src), ggufs[0].name
    if not has_safetensors or not (src / "config.json").is_file():
        raise SourceError(f"--reference {src}: not a model: expected config.json and "
                          "*.safetensors files, or a .gguf file")
    return str(src), None


def check_compatible(engine, reference) -> None:
    ours = text_config(engine.model.config).vocab_size
    theirs = text_config(reference.config).vocab_size
    if ours != theirs:
        raise ConfigError(
            f"--reference {getattr(reference, 'reference_path', '?')}: its vocabulary has "
            f"{theirs} tokens but {engine.directory} has {ours}; pass the model this "
            "directory was converted from")


# ----- scoring --------------------------------------------------------------------------

@dataclass
class _Totals:
    """Running sums over scored positions."""

    nll: float = 0.0  # quantized model, nats
    reference_nll: float = 0.0
    kl: float = 0.0
    agree: int = 0
    count: int = 0

    def add(self, logits: torch.Tensor, reference_logits: torch.Tensor,
            targets: torch.Tensor) -> None:
        """Fold in one batch: logits (B, T-1, V) predicting targets (B, T-1)."""
        logp = torch.log_softmax(logits.float(), dim=-1)
        ref_logp = torch.log_softmax(reference_logits.float(), dim=-1)
        index = targets.unsqueeze(-1)
        self.nll -= logp.gather(-1, index).sum().item()
        self.reference_nll -= ref_logp.gather(-1, index).sum().item()
        # KL(ref || q) = sum_v p_ref (log p_ref - log q); float64 sum for many positions
        self.kl += (ref_logp.exp() * (ref_logp - logp)).sum(-1).double().sum().item()
        self.agree += int((logp.argmax(-1) == ref_logp.argmax(-1)).sum())
        self.count += targets.numel()


def windows_of(ids: torch.Tensor, window: int) -> List[torch.Tensor]:
    """Consecutive, non-overlapping windows of at most ``window`` tokens, each >= 2."""
    pieces = list(ids[0].split(window))
    if len(pieces) > 1 and pieces[-1].numel() < 2:
        pieces.pop()  # a lone last token has nothing before it in its window
    return pieces


def batches_of(pieces: List[torch.Tensor], batch: int) -> List[torch.Tensor]:
    """Stack equal-length windows into (B, T) batches of at most ``batch`` rows."""
    out, current = [], []
    for piece in pieces:
        if current and (len(current) == batch or piece.numel() != current[0].numel()):
            out.append(torch.stack(current))
            current = []
        current.append(piece)
    if current:
        out.append(torch.stack(current))
    return out


@torch.inference_mode()
def score(engine, reference, ids: torch.Tensor, window: int, progress: bool) -> _Totals:
    vocab = text_config(engine.model.config).vocab_size
    batch = max(1, LOGITS_BUDGET_BYTES // (window * vocab * 4))
    totals = _Totals()
    for chunk in tqdm(batches_of(windows_of(ids, window), batch), desc="scoring",
                      unit="batch", disable=not progress):
        logits = engine.model(input_ids=chunk.to(engine.device), use_cache=False).logits
        reference_logits = reference(input_ids=chunk, use_cache=False).logits
        totals.add(logits[:, :-1].cpu(), reference_logits[:, :-1], chunk[:, 1:])
    return totals


def eval_inputs(engine, text: Optional[str], settings: EvalSettings):
    """(token ids, window, greedy prompt, greedy steps) within the model's context."""
    context = getattr(text_config(engine.model.config), "max_position_embeddings", None)
    window = min(settings.window, context or settings.window)
    ids = tokenize(engine.tokenizer, text, settings.tokens)
    prompt = ids[:, : min(settings.prompt_tokens, ids.shape[1])]
    steps = settings.greedy_tokens
    if context is not None:
        steps = max(0, min(steps, context - prompt.shape[1]))
    return ids, window, prompt, steps


@torch.inference_mode()
def greedy_agreement(engine, reference, prompt: torch.Tensor, steps: int) -> int:
    """Greedy tokens (with a KV cache) both models produce before the first difference."""
    if steps == 0:
        return 0
    ours = _GreedyStepper(engine.model, engine.device)
    theirs = _GreedyStepper(reference, torch.device("cpu"))
    return matching_greedy_steps(ours, theirs, prompt, steps)


def matching_greedy_steps(ours, theirs, prompt: torch.Tensor, steps: int) -> int:
    """Greedy tokens two steppers produce alike before the first difference (<= steps)."""
    a, b = ours.start(prompt), theirs.start(prompt)
    matching = 0
    while a == b:
        matching += 1
        if matching == steps:
            break
        a, b = ours.step(a), theirs.step(b)
    return matching


class _GreedyStepper:
    """Feeds one model its own greedy token, one step at a time, reusing the KV cache."""

    def __init__(self, model, device: torch.device):
        self.model, self.device, self.past = model, device, None

    def start(self, prompt: torch.Tensor) -> int:
        return self._forward(prompt)

    def step(self, token: int) -> int:
        return self._forward(torch.tensor([[token]]))

    def _forward(self, ids: torch.Tensor) -> int:
        out = self.model(input_ids=ids.to(self.device), use_cache=True,
                         **cache_kwargs(self.model, self.past))
        self.past = output_cache(out)
        return int(out.logits[0, -1].argmax())


def main_spec(store):
    """The spec holding the most linear parameters (a GGUF import may mix several)."""
    counts: dict = {}
    for name in store:
        weight = store.describe(name)  # shapes only: no read from a disk tier
        counts[weight.spec] = counts.get(weight.spec, 0) + weight.out_features * weight.in_features
    return max(counts, key=counts.get)


def linear_bytes_per_param(store) -> float:
    """Stored bytes per parameter of the quantized weights (padding and scales included)."""
    stored = sum(weight.nbytes for weight in store.values())
    params = sum(weight.out_features * weight.in_features for weight in store.values())
    return stored / params


def evaluate(engine, reference, text: Optional[str] = None,
             settings: Optional[EvalSettings] = None, progress: bool = True) -> EvalReport:
    """Score ``engine`` against an already loaded ``reference`` (see load_reference).

    ``text`` None means the default text; the reference may be reused across engines.
    """
    settings = settings or EvalSettings()
    started = time.perf_counter()
    check_compatible(engine, reference)
    ids, window, prompt, steps = eval_inputs(engine, text, settings)
    totals = score(engine, reference, ids, window, progress)
    matching = greedy_agreement(engine, reference, prompt, steps)
    perplexity = math.exp(totals.nll / totals.count)
    reference_perplexity = math.exp(totals.reference_nll / totals.count)
    spec = main_spec(engine.store)
    return EvalReport(
        model=str(engine.directory), reference=getattr(reference, "reference_path", "?"),
        scheme=spec.scheme, group_size=spec.group_size,
        linear_bytes_per_param=linear_bytes_per_param(engine.store),
        tokens=ids.shape[1], predictions=totals.count,
        windows=len(windows_of(ids, window)), window=window,
        perplexity=perplexity, reference_perplexity=reference_perplexity,
        perplexity_increase=perplexity / reference_perplexity - 1,
        mean_kl=totals.kl / totals.count, top1_agreement=totals.agree / totals.count,
        greedy_matching=matching, greedy_tokens=steps,
        device=str(engine.device), seconds=time.perf_counter() - started,
    )

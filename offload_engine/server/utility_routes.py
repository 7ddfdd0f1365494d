"""The routes beside generation: /v1/embeddings, /tokenize and /detokenize (vLLM's names).

Embeddings are the mean over the prompt's tokens of the model's last hidden state (after
its final norm), scaled to length 1 as OpenAI's are. A causal LM is not trained for this:
the vectors are usable for rough similarity, not as a substitute for an embedding model.
Each input is one forward on the scheduler thread (the engine is not thread-safe),
between two decode steps.
"""

from __future__ import annotations

import asyncio
import base64
from typing import List, Literal, Optional, Union

import torch
from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool

from .batcher import QueueFullError
from .schemas import ApiError, ChatMessage, _Strict, parse_body

MAX_EMBEDDING_INPUTS = 64  # inputs per /v1/embeddings request (each is one forward)


class EmbeddingRequest(_Strict):
    model: Optional[str] = None  # optional: one model is served
    input: Union[str, List[str], List[int], List[List[int]]]  # text(s) or token ids
    encoding_format: Literal["float", "base64"] = "float"  # base64: little-endian float32
    dimensions: Optional[int] = None  # only the model's hidden size (no truncation)
    user: Optional[str] = None  # accepted, unused


class TokenizeRequest(_Strict):
    model: Optional[str] = None
    prompt: Optional[str] = None  # vLLM's field
    content: Optional[str] = None  # llama-server's field
    messages: Optional[List[ChatMessage]] = None  # rendered with the chat template
    add_special_tokens: bool = True  # text only: the tokenizer's BOS and the like
    add_generation_prompt: bool = True  # messages only


class DetokenizeRequest(_Strict):
    model: Optional[str] = None
    tokens: List[int]


def _inputs(body: EmbeddingRequest, service) -> List[List[int]]:
    """Token ids per input; texts are tokenized as completions prompts are."""
    given = body.input
    if isinstance(given, str) or (given and isinstance(given[0], int)):
        given = [given]
    if not given or len(given) > MAX_EMBEDDING_INPUTS:
        raise ApiError(400, f"input must hold 1 to {MAX_EMBEDDING_INPUTS} items, "
                            f"got {len(given)}", param="input")
    vocab = service.engine.model.config.vocab_size
    out = []
    for i, item in enumerate(given):
        ids = service.encode(item, None) if isinstance(item, str) else list(item)
        if not ids:
            raise ApiError(400, f"input {i} is empty", param="input")
        if any(not 0 <= t < vocab for t in ids):
            raise ApiError(400, f"input {i} holds a token id outside 0..{vocab - 1}",
                           param="input")
        if service.context is not None and len(ids) > service.context:
            raise ApiError(400, f"input {i} has {len(ids)} tokens, more than the context of "
                                f"{service.context}", param="input",
                           code="context_length_exceeded")
        out.append(ids)
    return out


def mean_pooled(engine, ids: List[int]) -> torch.Tensor:
    """The unit-length mean of the last hidden state over ``ids`` (hidden,), float32."""
    output = engine.model(input_ids=torch.tensor([ids], device=engine.device),
                          use_cache=False, output_hidden_states=True, logits_to_keep=1)
    vector = output.hidden_states[-1][0].float().mean(dim=0)  # (H,)
    return torch.nn.functional.normalize(vector, dim=0).cpu()


def _encoded(vector: torch.Tensor, encoding: str):
    if encoding == "base64":
        return base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


async def _embeddings(service, raw: bytes) -> dict:
    body = parse_body(raw, EmbeddingRequest)
    service.check_model(body.model)
    hidden = service.engine.model.config.get_text_config().hidden_size
    if body.dimensions is not None and body.dimensions != hidden:
        raise ApiError(400, f"dimensions: this model's embeddings have {hidden}; other sizes "
                            "are not supported (leave dimensions out)", param="dimensions")
    inputs = await run_in_threadpool(_inputs, body, service)
    engine = service.engine
    try:
        future = service.scheduler.run_exclusive(
            lambda: [mean_pooled(engine, ids) for ids in inputs])
    except QueueFullError as exc:
        raise ApiError(503, str(exc), type="server_error") from None
    vectors = await asyncio.wrap_future(future)
    used = sum(len(ids) for ids in inputs)
    return {"object": "list", "model": service.model_id,
            "data": [{"object": "embedding", "index": i,
                      "embedding": _encoded(vector, body.encoding_format)}
                     for i, vector in enumerate(vectors)],
            "usage": {"prompt_tokens": used, "total_tokens": used}}


def _tokenize(service, raw: bytes) -> dict:
    body = parse_body(raw, TokenizeRequest)
    service.check_model(body.model)
    given = [name for name in ("prompt", "content", "messages") if getattr(body, name) is not None]
    if len(given) != 1:
        raise ApiError(400, "give exactly one of prompt, content (text) or messages (chat)",
                       param=given[1] if len(given) > 1 else "prompt")
    tokenizer = service.engine.tokenizer
    with service.tokenizer_lock:
        if body.messages is not None:
            if not getattr(tokenizer, "chat_template", None):
                raise ApiError(400, "this model's tokenizer has no chat template; tokenize a "
                                    "prompt instead", param="messages")
            ids = list(tokenizer.apply_chat_template(
                [m.as_template_message() for m in body.messages], return_dict=True,
                add_generation_prompt=body.add_generation_prompt)["input_ids"])
        else:
            text = body.prompt if body.prompt is not None else body.content
            ids = tokenizer(text, add_special_tokens=body.add_special_tokens)["input_ids"]
    return {"tokens": ids, "count": len(ids), "max_model_len": service.context}


def _detokenize(service, raw: bytes) -> dict:
    body = parse_body(raw, DetokenizeRequest)
    service.check_model(body.model)
    vocab = len(service.engine.tokenizer)
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise ApiError(400, f"tokens: {bad[0]} is not a token id of this tokenizer "
                            f"(0..{vocab - 1})", param="tokens")
    with service.tokenizer_lock:
        text = service.engine.tokenizer.decode(body.tokens)
    return {"prompt": text, "content": text}  # vLLM's and llama-server's names


def add_utility_routes(app: FastAPI, served) -> None:
    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        service = served.service
        return await _embeddings(service, await request.body())

    @app.post("/tokenize")
    async def tokenize(request: Request):
        service = served.service
        return await run_in_threadpool(_tokenize, service, await request.body())

    @app.post("/detokenize")
    async def detokenize(request: Request):
        service = served.service
        return await run_in_threadpool(_detokenize, service, await request.body())

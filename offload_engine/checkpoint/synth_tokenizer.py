"""A small real tokenizer for synthetic models: a byte-level BPE trained in about two seconds.

A synthetic model's text is noise, but `run`, `chat` and `bench` need a tokenizer that
encodes any prompt and decodes any id it produces. A byte-level BPE covers every input;
its vocabulary (at most 512 ids) is trained on CPython's ``pydoc_data.topics``, which
ships with Python, so nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BYTE_ALPHABET = 256
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_tokenizer(directory: Path, vocab_size: int = 512):
    """Train, save into ``directory`` and return a PreTrainedTokenizerFast."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < BYTE_ALPHABET + len(SPECIAL_TOKENS):
        raise ConfigError(f"a byte-level tokenizer needs at least "
                          f"{BYTE_ALPHABET + len(SPECIAL_TOKENS)} ids; the model has {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(list(topics.values())[:200], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|im_start|>",
                                   eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    return fast

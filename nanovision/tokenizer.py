"""Byte-level BPE tokenizer and chat template for nanovision.

`train_tokenizer` trains a byte-level BPE model with the `tokenizers` library and wraps it in a
`transformers.PreTrainedTokenizerFast`, so it can be saved with `save_pretrained` and reloaded with
`AutoTokenizer.from_pretrained` (no remote code needed: the class is a stock transformers class).

Conventions
-----------
* Byte-level pre-tokenizer and decoder, no normalizer: every string round-trips exactly through
  `encode` / `decode` (including arbitrary unicode and whitespace).
* The special tokens of :data:`SPECIAL_TOKENS` have ids ``0..9`` in that order.
* Encoding plain text **never adds special tokens** (no BOS/EOS template post-processor; the
  post-processor is a plain byte-level one that only maps offsets). Callers add ``<|bos|>``
  themselves, e.g. base pretraining documents are ``<|bos|>`` + text + ``<|end|>``; the chat
  template adds ``<|bos|>`` once at the start of a conversation.
* ``<|end|>`` is the EOS token: it ends a pretraining document and every chat turn, and is the
  generation stop token.
* ``<image>`` is the image placeholder; the processor expands each one to
  ``<|image_start|>`` + ``<image>`` * num_image_tokens + ``<|image_end|>``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|end|>"
PAD_TOKEN = "<|pad|>"
SYSTEM_TOKEN = "<|system|>"
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
IMAGE_TOKEN = "<image>"
IMAGE_START_TOKEN = "<|image_start|>"
IMAGE_END_TOKEN = "<|image_end|>"
RESERVED_TOKEN = "<|reserved|>"

# Order matters: the position in this list is the token id.
SPECIAL_TOKENS = [
    BOS_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    SYSTEM_TOKEN,
    USER_TOKEN,
    ASSISTANT_TOKEN,
    IMAGE_TOKEN,
    IMAGE_START_TOKEN,
    IMAGE_END_TOKEN,
    RESERVED_TOKEN,
]
SPECIAL_TOKEN_IDS = {token: index for index, token in enumerate(SPECIAL_TOKENS)}

# Named multimodal tokens. transformers 5.x turns a dict of `extra_special_tokens` into attributes,
# so `tokenizer.image_token` / `tokenizer.image_token_id` (and the start/end variants) work, and they
# are saved to / restored from tokenizer_config.json.
MULTIMODAL_SPECIAL_TOKENS = {
    "image_token": IMAGE_TOKEN,
    "image_start_token": IMAGE_START_TOKEN,
    "image_end_token": IMAGE_END_TOKEN,
}

# Chat template (HF messages convention).
#   <|bos|> once, then per message: <|role|> + content + <|end|>, role in system/user/assistant.
#   Content is a string or a list of parts {"type": "text", "text": ...} / {"type": "image", ...};
#   image parts (also OpenAI-style "image_url") render as the "<image>" placeholder; any other part
#   type raises.
#   The assistant content *and its closing <|end|>* sit inside {% generation %} so that
#   `return_assistant_tokens_mask=True` marks exactly the tokens the model must learn to produce.
#   add_generation_prompt appends "<|assistant|>".
CHAT_TEMPLATE = (
    "{%- macro render_content(content) -%}"
    "{%- if content is string -%}"
    "{{- content -}}"
    "{%- elif content is none -%}"
    "{%- else -%}"
    "{%- for part in content -%}"
    "{%- if part is string -%}"
    "{{- part -}}"
    "{%- elif part['type'] == 'text' -%}"
    "{{- part['text'] -}}"
    "{%- elif part['type'] in ['image', 'image_url'] -%}"
    "{{- '<image>' -}}"
    "{%- else -%}"
    "{{- raise_exception('Unsupported content part type: ' ~ part['type']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{{- '<|bos|>' -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('Unknown role: ' ~ message['role'] ~ ' (expected system, user or assistant)') -}}"
    "{%- endif -%}"
    "{{- '<|' ~ message['role'] ~ '|>' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}"
    "{{- render_content(message['content']) ~ '<|end|>' -}}"
    "{%- endgeneration -%}"
    "{%- else -%}"
    "{{- render_content(message['content']) ~ '<|end|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|assistant|>' -}}"
    "{%- endif -%}"
)


def _iter_texts(texts: Iterable[str]) -> Iterator[str]:
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"train_tokenizer expects an iterable of str; item {index} is {type(text).__name__}")
        yield text


def build_backend_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE `tokenizers.Tokenizer` with nanovision's pipeline."""
    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = None
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    # Offsets-only post-processor: adds no special tokens (no BOS/EOS template). Having a
    # post-processor also stops transformers from installing its own BOS/EOS template.
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False)
    return tokenizer


def wrap_tokenizer(backend: Tokenizer, model_max_length: int = 2048) -> PreTrainedTokenizerFast:
    """Wrap a trained backend tokenizer into a transformers tokenizer with nanovision's specials."""
    for token, expected_id in SPECIAL_TOKEN_IDS.items():
        actual = backend.token_to_id(token)
        if actual != expected_id:
            raise ValueError(f"special token {token!r} has id {actual}, expected {expected_id}")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=dict(MULTIMODAL_SPECIAL_TOKENS),
        model_max_length=model_max_length,
        padding_side="right",
        truncation_side="right",
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 4096,
    min_frequency: int = 2,
    model_max_length: int = 2048,
) -> PreTrainedTokenizerFast:
    """Train nanovision's byte-level BPE tokenizer on ``texts``.

    Args:
        texts: any iterable of strings (consumed once, streaming).
        vocab_size: final vocabulary size, including the 10 special tokens and the 256 byte symbols.
        min_frequency: minimum pair frequency for a merge.
        model_max_length: stored as the tokenizer's ``model_max_length``.

    Returns:
        A `PreTrainedTokenizerFast` with ids 0..9 = :data:`SPECIAL_TOKENS`, bos ``<|bos|>``,
        eos ``<|end|>``, pad ``<|pad|>``, no unk token, ``image_token`` ``<image>`` and the chat
        template :data:`CHAT_TEMPLATE`. Encoding never adds special tokens by itself.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    minimum = len(SPECIAL_TOKENS) + len(alphabet)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size must be at least {minimum} (specials + 256 bytes), got {vocab_size}")
    backend = build_backend_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    backend.train_from_iterator(_iter_texts(texts), trainer=trainer)
    return wrap_tokenizer(backend, model_max_length=model_max_length)


__all__ = [
    "SPECIAL_TOKENS",
    "SPECIAL_TOKEN_IDS",
    "BOS_TOKEN",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "SYSTEM_TOKEN",
    "USER_TOKEN",
    "ASSISTANT_TOKEN",
    "IMAGE_TOKEN",
    "IMAGE_START_TOKEN",
    "IMAGE_END_TOKEN",
    "RESERVED_TOKEN",
    "CHAT_TEMPLATE",
    "train_tokenizer",
    "build_backend_tokenizer",
    "wrap_tokenizer",
]

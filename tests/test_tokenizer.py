"""Tests for nanovision.tokenizer (tiny tokenizer trained in-test, CPU only, no downloads)."""

import random

import pytest

from transformers import AutoTokenizer, PreTrainedTokenizerFast

from nanovision.tokenizer import (
    CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    train_tokenizer,
)

SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "ta", "shi", "po", "ve", "zu", "an", "el", "or", "ix", "um"]


def make_corpus(n=300, seed=0):
    rng = random.Random(seed)
    words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(120)]
    words += ["the", "a", "cat", "dog", "image", "picture", "of", "with", "and", "is", "red", "blue"]
    sentences = []
    for _ in range(n):
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(4, 14)))
        sentences.append(sentence.capitalize() + rng.choice([".", "!", "?"]))
    return sentences


@pytest.fixture(scope="module")
def tok():
    # a generator on purpose: texts may be any iterable
    return train_tokenizer((s for s in make_corpus()), vocab_size=500, model_max_length=1024)


def test_type_and_vocab(tok):
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert len(SPECIAL_TOKENS) + 256 < len(tok) <= 500
    assert tok.model_max_length == 1024


def test_special_token_ids(tok):
    assert SPECIAL_TOKENS == [
        "<|bos|>",
        "<|end|>",
        "<|pad|>",
        "<|system|>",
        "<|user|>",
        "<|assistant|>",
        "<image>",
        "<|image_start|>",
        "<|image_end|>",
        "<|reserved|>",
    ]
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(10))
    assert (tok.bos_token, tok.bos_token_id) == ("<|bos|>", 0)
    assert (tok.eos_token, tok.eos_token_id) == ("<|end|>", 1)
    assert (tok.pad_token, tok.pad_token_id) == ("<|pad|>", 2)
    assert tok.unk_token is None
    assert (tok.image_token, tok.image_token_id) == ("<image>", 6)
    assert tok.image_start_token_id == 7 and tok.image_end_token_id == 8
    # every special token is a single id, even glued to text
    for index, token in enumerate(SPECIAL_TOKENS):
        ids = tok.encode(f"ab{token}cd", add_special_tokens=False)
        assert ids.count(index) == 1


ROUND_TRIP_TEXTS = [
    "",
    " ",
    "Hello, world!",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n\n",
    "Ünïcödé — “quotes” ‘single’ … ½ ∑ ∞ ≠",
    "日本語のテキストと中文和한국어",
    "emoji 🌍🚀👩‍👩‍👧‍👦 flags 🇫🇷 skin 👍🏽",
    "combining e\u0301 and zero\u200bwidth and RTL \u05e9\u05dc\u05d5\u05dd",
    "\x00\x01 control \x7f chars",
    "specials inline <|bos|>x<|end|> <image> <|image_start|><|image_end|>",
    "code: def f(x):\n    return x ** 2  # ok",
]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text


def test_round_trip_random_unicode(tok):
    rng = random.Random(1)
    for _ in range(200):
        chars = []
        for _ in range(rng.randint(0, 40)):
            cp = rng.randint(0, 0x10FFFF)
            if 0xD800 <= cp <= 0xDFFF:  # surrogates are not valid str content for encoding
                cp = 0x20
            chars.append(chr(cp))
        text = "".join(chars)
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_no_special_tokens_added_automatically(tok):
    plain = tok("Hello cat", add_special_tokens=False)["input_ids"]
    default = tok("Hello cat")["input_ids"]
    assert default == plain
    assert tok.encode("Hello cat") == plain
    assert tok.bos_token_id not in default and tok.eos_token_id not in default


def test_batch_padding_uses_pad_token(tok):
    out = tok(["a", "a longer sentence here"], padding=True)
    assert out["input_ids"][0][-1] == tok.pad_token_id
    assert out["attention_mask"][0][-1] == 0


def test_chat_template_text(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
    ]
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert rendered == (
        "<|bos|><|system|>Be brief.<|end|><|user|>Hi!<|end|><|assistant|>Hello.<|end|>"
    )
    assert tok.chat_template == CHAT_TEMPLATE


def test_chat_template_image_parts(tok):
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Look: "},
                {"type": "image"},
                {"type": "text", "text": " and "},
                {"type": "image", "url": "ignored.png"},
                {"type": "image_url", "image_url": {"url": "ignored.png"}},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "Two cats."}]},
    ]
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert rendered == "<|bos|><|user|>Look: <image> and <image><image><|end|><|assistant|>Two cats.<|end|>"
    with pytest.raises(Exception, match="Unsupported content part type: video"):
        tok.apply_chat_template([{"role": "user", "content": [{"type": "video"}]}], tokenize=False)


def test_generation_prompt(tok):
    messages = [{"role": "user", "content": "Describe it."}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<|bos|><|user|>Describe it.<|end|><|assistant|>"
    )
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert ids[-1] == tok.convert_tokens_to_ids("<|assistant|>")


def test_unknown_role_raises(tok):
    with pytest.raises(Exception, match="Unknown role: tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def _expected_assistant_mask(ids, assistant_id, end_id):
    mask, inside = [], False
    for token in ids:
        if inside:
            mask.append(1)
            if token == end_id:
                inside = False
        else:
            mask.append(0)
            if token == assistant_id:
                inside = True
    return mask


def test_assistant_mask_marks_exactly_assistant_tokens(tok):
    messages = [
        {"role": "system", "content": "You describe images."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A red cat with a blue dog."},
        {"role": "user", "content": "And then?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Kalomi ruta!"}]},
    ]
    out = tok.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(mask) == len(ids)
    expected = _expected_assistant_mask(ids, tok.convert_tokens_to_ids("<|assistant|>"), tok.eos_token_id)
    assert mask == expected
    masked_text = tok.decode([t for t, m in zip(ids, mask) if m])
    assert masked_text == "A red cat with a blue dog.<|end|>Kalomi ruta!<|end|>"


def test_autotokenizer_reload(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(reloaded, PreTrainedTokenizerFast)
    assert reloaded.get_vocab() == tok.get_vocab()
    assert len(reloaded) == len(tok)
    assert reloaded.chat_template == tok.chat_template
    assert reloaded.special_tokens_map == tok.special_tokens_map
    assert (reloaded.image_token, reloaded.image_token_id) == ("<image>", 6)
    assert reloaded.model_max_length == tok.model_max_length
    assert reloaded.padding_side == tok.padding_side
    for text in ROUND_TRIP_TEXTS:
        assert reloaded.encode(text) == tok.encode(text)
        assert reloaded.decode(tok.encode(text)) == text
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    assert reloaded.apply_chat_template(messages, add_generation_prompt=True) == tok.apply_chat_template(
        messages, add_generation_prompt=True
    )
    # still no automatic BOS after reload
    assert reloaded("Hello")["input_ids"] == tok("Hello", add_special_tokens=False)["input_ids"]


def test_vocab_size_validation():
    with pytest.raises(ValueError, match="at least"):
        train_tokenizer(["abc"], vocab_size=100)
    with pytest.raises(TypeError, match="item 1"):
        train_tokenizer(["abc", 3], vocab_size=300)

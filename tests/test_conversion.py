"""Conversion of transformers causal LMs (Llama, Mistral, Qwen2, Qwen3, nanochat) into nanovision models."""

import dataclasses
import importlib.util
import json
import pathlib

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    NanoChatConfig,
    NanoChatForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.models.nanochat import modeling_nanochat

from conftest import run_without_nanovision
from nanovision import NanoVisionForCausalLM, conversion, modeling_nanovision
from nanovision.conversion import convert_checkpoint, convert_config, convert_from_transformers

VOCAB = 96
TINY = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, bos_token_id=3, eos_token_id=4, pad_token_id=5,
)
LLAMA3_ROPE = {
    "rope_type": "llama3", "rope_theta": 5000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}

SOURCES = {
    "llama": (LlamaForCausalLM, LlamaConfig, {}),
    "llama_llama3_rope_tied_head_dim": (
        LlamaForCausalLM, LlamaConfig, dict(rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True, head_dim=32),
    ),
    "mistral": (MistralForCausalLM, MistralConfig, dict(sliding_window=None)),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config, dict(tie_word_embeddings=True)),
    "qwen3": (Qwen3ForCausalLM, Qwen3Config, dict(head_dim=16)),
    "nanochat": (NanoChatForCausalLM, NanoChatConfig, dict(final_logit_softcapping=3.0)),
}


def build_source(name, dtype=torch.float32, seed=0):
    """A tiny randomly initialised source model, every parameter drawn anew (norm weights around 1, the rest
    around 0) so that a parameter put in the wrong place changes the logits."""
    model_cls, config_cls, overrides = SOURCES[name]
    config = config_cls(**{**TINY, **overrides})
    torch.manual_seed(seed)
    # built in `dtype` as from_pretrained does (model.to(dtype) would also cast the float32 rotary tables)
    model = model_cls._from_config(config, dtype=dtype).eval()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            torch.nn.init.normal_(param, mean=1.0 if "norm" in param_name else 0.0, std=0.3)
    return model


def random_batch(seed=1):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (3, 17), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :5] = 0  # left padding in one row
    return input_ids, attention_mask


@torch.no_grad()
def assert_same_logits(source, converted, atol=1e-4):
    input_ids, attention_mask = random_batch()
    expected = source(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    actual = converted(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    keep = attention_mask.bool()
    torch.testing.assert_close(actual[keep], expected[keep], atol=atol, rtol=1e-4)
    return expected


@pytest.mark.parametrize("name", list(SOURCES))
def test_logits_and_greedy_generation_match(name):
    source = build_source(name)
    converted = convert_from_transformers(source)
    assert isinstance(converted, NanoVisionForCausalLM)
    assert converted.dtype == torch.float32
    expected = assert_same_logits(source, converted)
    assert expected.std() > 0.5  # random weights give non-trivial logits, so the comparison can fail

    config, source_config = converted.config, source.config
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "rms_norm_eps", "tie_word_embeddings",
                "max_position_embeddings", "num_key_value_heads"):
        assert getattr(config, key) == getattr(source_config, key), key
    assert config.rope_parameters == source_config.rope_parameters
    if config.tie_word_embeddings:
        assert converted.lm_head.weight.data_ptr() == converted.model.embed_tokens.weight.data_ptr()

    prompt = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    settings = dict(max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=TINY["pad_token_id"])
    assert torch.equal(converted.generate(prompt, **settings), source.generate(prompt, **settings))


def test_nanochat_config_mapping():
    config = convert_config(build_source("nanochat").config)
    assert (config.mlp_type, config.norm_weights, config.embedding_norm, config.qk_norm) == (
        "relu2", False, True, "parameter_free")
    assert config.final_logit_softcapping == 3.0 and config.attention_bias is False


def test_nanochat_rotary_flip_derivation():
    """Negating the second half of each q/k head turns nanochat's rotation (by -angle) into nanovision's (by
    +angle) up to that same sign flip, which cancels in q.k; parameter-free RMSNorm ignores it."""
    config = convert_config(build_source("nanochat").config)
    rotary = modeling_nanovision.NanoVisionRotaryEmbedding(config)
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 9, 16, generator=generator), torch.randn(2, 2, 9, 16, generator=generator)
    cos, sin = rotary(q, torch.arange(9)[None].expand(2, -1))

    def flip(x):  # F: negate the second half of each head
        return torch.cat([x[..., :8], -x[..., 8:]], dim=-1)

    q_theirs, k_theirs = modeling_nanochat.apply_rotary_pos_emb(q, k, cos, sin)
    q_ours, k_ours = modeling_nanovision.apply_rotary_pos_emb(flip(q), flip(k), cos, sin)
    torch.testing.assert_close(q_ours, flip(q_theirs))  # R(F(x)) = F(R'(x))
    torch.testing.assert_close(k_ours, flip(k_theirs))
    scores_theirs = q_theirs @ k_theirs.repeat_interleave(2, dim=1).transpose(-1, -2)
    scores_ours = q_ours @ k_ours.repeat_interleave(2, dim=1).transpose(-1, -2)
    torch.testing.assert_close(scores_ours, scores_theirs)
    # without the flip the two conventions disagree
    q_plain, _ = modeling_nanovision.apply_rotary_pos_emb(q, k, cos, sin)
    assert not torch.allclose(q_plain, q_theirs, atol=1e-3)
    # the flip commutes with the parameter-free norm applied before (nanovision) or after (nanochat) the rotation
    norm = modeling_nanochat.NanoChatRMSNorm(eps=1e-6)
    torch.testing.assert_close(norm(flip(q)), flip(norm(q)))
    torch.testing.assert_close(norm(q_theirs), modeling_nanochat.apply_rotary_pos_emb(norm(q), k, cos, sin)[0])


def test_nanochat_without_flip_gives_different_logits(monkeypatch):
    source = build_source("nanochat")
    unflipped = dataclasses.replace(conversion.ARCHITECTURES["nanochat"], flipped_rotary=False)
    monkeypatch.setitem(conversion.ARCHITECTURES, "nanochat", unflipped)
    with pytest.raises(AssertionError):
        assert_same_logits(source, convert_from_transformers(source))


def test_dtype_is_kept():
    source = build_source("llama", dtype=torch.bfloat16)
    converted = convert_from_transformers(source)
    assert {p.dtype for p in converted.parameters()} == {torch.bfloat16}
    assert converted.model.rotary_emb.inv_freq.dtype == torch.float32
    for ours, theirs in zip(converted.state_dict().values(), source.state_dict().values()):
        assert torch.equal(ours, theirs)
    assert_same_logits(source, converted)  # same bf16 ops in the same order


@pytest.mark.parametrize(
    "config, field",
    [
        (LlamaConfig(**TINY, attention_bias=True), "attention_bias"),
        (LlamaConfig(**TINY, mlp_bias=True), "mlp_bias"),
        (LlamaConfig(**TINY, hidden_act="gelu"), "hidden_act"),
        (LlamaConfig(**TINY, rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                               "partial_rotary_factor": 0.5}), "partial_rotary_factor"),
        (MistralConfig(**TINY, sliding_window=32), "sliding_window"),
        (Qwen2Config(**TINY, use_sliding_window=True, sliding_window=32, max_window_layers=1), "layer_types"),
        (Qwen3Config(**TINY, attention_bias=True), "attention_bias"),
        (NanoChatConfig(**TINY, attention_bias=True), "attention_bias"),
        (NanoChatConfig(**TINY, hidden_act="gelu"), "hidden_act"),
        (GPT2Config(), "model_type"),
    ],
    ids=lambda value: value if isinstance(value, str) else type(value).__name__,
)
def test_unsupported_settings_raise(config, field):
    with pytest.raises(ValueError, match=field):
        convert_config(config)


def _tiny_tokenizer():
    from nanovision.tokenizer import train_tokenizer

    return train_tokenizer(["hello world, a tiny tokenizer for a tiny model"] * 4, vocab_size=300)


def test_convert_checkpoint_folder_loads_as_remote_code(tmp_path, no_nanovision_env):
    source = build_source("llama")
    source.save_pretrained(tmp_path / "src")
    _tiny_tokenizer().save_pretrained(tmp_path / "src")
    dst = tmp_path / "nanovision_converted_llama"
    convert_checkpoint(str(tmp_path / "src"), str(dst))

    saved = json.loads((dst / "config.json").read_text())
    assert saved["model_type"] == "nanovision_text"
    assert saved["auto_map"] == {
        "AutoConfig": "configuration_nanovision.NanoVisionTextConfig",
        "AutoModel": "modeling_nanovision.NanoVisionTextModel",
        "AutoModelForCausalLM": "modeling_nanovision.NanoVisionForCausalLM",
    }
    assert (dst / "modeling_nanovision.py").is_file() and (dst / "configuration_nanovision.py").is_file()

    loaded = AutoModelForCausalLM.from_pretrained(dst, trust_remote_code=True).eval()
    assert type(loaded).__name__ == "NanoVisionForCausalLM"
    expected = assert_same_logits(source, loaded)

    # The folder's own copy of the code, where nanovision cannot be imported, gives the same logits.
    input_ids, attention_mask = random_batch()
    torch.save({"input_ids": input_ids, "attention_mask": attention_mask}, tmp_path / "batch.pt")
    run_without_nanovision(
        "import torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(dst)!r}, trust_remote_code=True).eval()\n"
        "assert type(model).__module__.startswith('transformers_modules'), type(model).__module__\n"
        f"batch = torch.load({str(tmp_path / 'batch.pt')!r})\n"
        "with torch.no_grad():\n"
        f"    torch.save(model(**batch).logits, {str(tmp_path / 'logits.pt')!r})\n",
        no_nanovision_env, tmp_path,
    )
    remote_logits = torch.load(tmp_path / "logits.pt")
    keep = attention_mask.bool()
    torch.testing.assert_close(remote_logits[keep], expected[keep], atol=1e-4, rtol=1e-4)

    tokenizer = AutoTokenizer.from_pretrained(dst)
    assert tokenizer("hello world")["input_ids"] == _tiny_tokenizer()("hello world")["input_ids"]


def test_cli_with_dtype_and_no_tokenizer(tmp_path):
    build_source("qwen3").save_pretrained(tmp_path / "src")
    script = pathlib.Path(__file__).resolve().parents[1] / "examples" / "convert_checkpoint.py"
    spec = importlib.util.spec_from_file_location("convert_checkpoint_cli", script)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    dst = tmp_path / "nanovision_converted_qwen3"
    cli.main([str(tmp_path / "src"), str(dst), "--dtype", "bfloat16"])

    assert json.loads((dst / "config.json").read_text())["dtype"] == "bfloat16"
    assert not (dst / "tokenizer_config.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(dst, trust_remote_code=True)
    assert loaded.dtype == torch.bfloat16
    assert loaded.config.qk_norm == "learnable"

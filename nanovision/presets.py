"""Ready-made text configs, sized by depth as in nanochat: one number sets the whole shape."""

from .configuration_nanovision import NanoVisionTextConfig


def _kv_heads_for_ratio(num_heads: int, ratio: int) -> int:
    """The largest number of kv heads that divides num_heads and is at most num_heads / ratio."""
    return next(kv for kv in range(max(1, num_heads // ratio), 0, -1) if num_heads % kv == 0)


def _round_up(value: float, multiple: int) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


def _depth_scaled(depth: int, vocab_size: int, head_dim: int) -> dict:
    """nanochat's one-knob shape: width 64 * depth, as many heads of head_dim as fit."""
    hidden_size = 64 * depth
    return dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=depth,
                num_attention_heads=max(1, hidden_size // head_dim), head_dim=head_dim, tie_word_embeddings=False)


def text_config(depth: int = 20, vocab_size: int = 50304, head_dim: int = 128, **overrides) -> NanoVisionTextConfig:
    """Llama-style block at nanochat's depth scaling: width 64 * depth, heads of `head_dim`, GQA 2:1,
    SwiGLU about 2.7x wide (rounded to 128), learnable norms, untied embeddings.

    depth=20 gives hidden 1280, 10 heads, 5 kv heads, SwiGLU 3456.
    """
    settings = _depth_scaled(depth, vocab_size, head_dim)
    settings.update(
        num_key_value_heads=_kv_heads_for_ratio(settings["num_attention_heads"], 2),
        intermediate_size=_round_up(2.7 * settings["hidden_size"], 128),
        mlp_type="swiglu",
    )
    settings.update(overrides)
    return NanoVisionTextConfig(**settings)


def nanochat_config(depth: int = 20, vocab_size: int = 65536, head_dim: int = 128, **overrides) -> NanoVisionTextConfig:
    """nanochat's original block: relu² MLP 4x wide, parameter-free RMSNorms (also right after the embedding),
    parameter-free QK-norm, logit softcap 15, untied embeddings, one kv head per query head."""
    settings = _depth_scaled(depth, vocab_size, head_dim)
    settings.update(
        num_key_value_heads=settings["num_attention_heads"],
        intermediate_size=4 * settings["hidden_size"],
        mlp_type="relu2",
        norm_weights=False,
        embedding_norm=True,
        qk_norm="parameter_free",
        final_logit_softcapping=15.0,
    )
    settings.update(overrides)
    return NanoVisionTextConfig(**settings)

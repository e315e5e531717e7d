"""Convert transformers causal language models into nanovision text models.

Supported sources (by `config.model_type`):

* ``llama``, ``mistral``, ``qwen2``, ``qwen3``: the Llama-style block. Learnable RMSNorms, SwiGLU MLP, rotary
  attention with GQA; Qwen2 adds a bias on q/k/v, Qwen3 a learnable per-head RMSNorm on q and k before the rotary
  embedding. These map one to one onto nanovision's modules: only a few names differ.
* ``nanochat``: transformers' port of nanochat. relu² MLP (``fc1``/``fc2``), parameter-free RMSNorms, one norm
  module used both right after the token embedding and as the final norm, parameter-free QK-norm *after* the rotary
  embedding, a flipped rotary convention and a logit softcap. How the last three map is explained in
  `_negate_second_half_of_each_head`.

Anything the nanovision block cannot express raises a `ValueError` that names the source config field and value.

Usage::

    from nanovision.conversion import convert_checkpoint, convert_from_transformers
    nano_model = convert_from_transformers(hf_model)                       # in memory
    convert_checkpoint("path/to/llama", "path/to/out", dtype="bfloat16")  # folder to folder
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .configuration_nanovision import TEXT_AUTO_MAP, NanoVisionTextConfig
from .modeling_nanovision import NanoVisionForCausalLM, NanoVisionTextModel


@dataclass(frozen=True)
class _Architecture:
    """How one transformers architecture maps onto the nanovision block."""

    mlp_type: str  # nanovision MLP: "swiglu" or "relu2"
    hidden_act: str  # the only source activation that MLP computes
    norm_weights: bool  # the source RMSNorms have learnable weights
    embedding_norm: bool  # the source normalises the token embeddings before the first block
    qk_norm: str  # nanovision qk_norm that reproduces the source's
    qkv_bias: bool  # the source always biases q/k/v (and never o_proj)
    # Boolean source config fields that nanovision cannot express when True -> what they would add.
    must_be_false: dict[str, str] = field(default_factory=dict)
    # Source rotary uses rotate_half(x) = cat(x2, -x1), i.e. rotates by -angle: see _negate_second_half_of_each_head.
    flipped_rotary: bool = False
    # nanovision parameter name fragment -> source fragment (applied with str.replace).
    renames: dict[str, str] = field(default_factory=dict)


# These sources' attention_bias biases o_proj as well as q/k/v; nanovision's o_proj never has a bias.
_O_PROJ_BIAS = {"attention_bias": "it also puts a bias on o_proj, which nanovision's attention never has"}

ARCHITECTURES: dict[str, _Architecture] = {
    "llama": _Architecture(
        mlp_type="swiglu", hidden_act="silu", norm_weights=True, embedding_norm=False, qk_norm="none", qkv_bias=False,
        must_be_false={**_O_PROJ_BIAS, "mlp_bias": "nanovision's MLP projections have no bias"},
    ),
    "mistral": _Architecture(
        mlp_type="swiglu", hidden_act="silu", norm_weights=True, embedding_norm=False, qk_norm="none", qkv_bias=False,
    ),
    "qwen2": _Architecture(
        mlp_type="swiglu", hidden_act="silu", norm_weights=True, embedding_norm=False, qk_norm="none", qkv_bias=True,
    ),
    "qwen3": _Architecture(
        mlp_type="swiglu", hidden_act="silu", norm_weights=True, embedding_norm=False, qk_norm="learnable",
        qkv_bias=False, must_be_false=_O_PROJ_BIAS,
    ),
    # nanochat's QK-norm comes after the rotary embedding; being parameter-free it commutes with the rotation
    # (a rotation keeps the RMS of each head), so nanovision's norm-then-rotate computes the same thing.
    "nanochat": _Architecture(
        mlp_type="relu2", hidden_act="relu2", norm_weights=False, embedding_norm=True, qk_norm="parameter_free",
        qkv_bias=False, must_be_false=_O_PROJ_BIAS, flipped_rotary=True,
        renames={".mlp.up_proj.": ".mlp.fc1.", ".mlp.down_proj.": ".mlp.fc2."},
    ),
}


def _architecture(source_config) -> _Architecture:
    model_type = getattr(source_config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"Cannot convert model_type={model_type!r}: supported source architectures are {sorted(ARCHITECTURES)}."
        )
    return ARCHITECTURES[model_type]


def _check_expressible(source_config, arch: _Architecture) -> None:
    """Raise a ValueError naming the first source setting the nanovision block cannot express."""
    name = type(source_config).__name__
    for flag, reason in arch.must_be_false.items():
        if getattr(source_config, flag, False):
            raise ValueError(f"{name}.{flag}={getattr(source_config, flag)!r} cannot be converted: {reason}.")
    hidden_act = getattr(source_config, "hidden_act", arch.hidden_act)
    if hidden_act != arch.hidden_act:
        raise ValueError(f"{name}.hidden_act={hidden_act!r} cannot be converted: nanovision's {arch.mlp_type} MLP "
                         f"computes {arch.hidden_act!r}.")
    layer_types = getattr(source_config, "layer_types", None)
    if layer_types is not None and any(layer_type != "full_attention" for layer_type in layer_types):
        raise ValueError(f"{name}.layer_types={list(layer_types)!r} cannot be converted: nanovision has only full "
                         f"causal attention (no sliding window).")
    # Qwen2/Qwen3 keep sliding_window=None unless use_sliding_window, and then list the windowed layers in layer_types
    # (checked above); Mistral applies a non-None sliding_window to every layer.
    if layer_types is None and getattr(source_config, "sliding_window", None) is not None:
        raise ValueError(f"{name}.sliding_window={source_config.sliding_window!r} cannot be converted: nanovision has "
                         f"only full causal attention. Set it to None if the checkpoint never used the window.")
    rope_parameters = getattr(source_config, "rope_parameters", None) or {}
    for where, factor in (("rope_parameters['partial_rotary_factor']", rope_parameters.get("partial_rotary_factor")),
                          ("partial_rotary_factor", getattr(source_config, "partial_rotary_factor", None))):
        if factor is not None and factor != 1.0:
            raise ValueError(f"{name}.{where}={factor!r} cannot be converted: nanovision rotates the whole head.")
    rope_type = rope_parameters.get("rope_type", "default")
    if rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"{name}.rope_parameters['rope_type']={rope_type!r} cannot be converted: nanovision supports "
                         f"{['default', *ROPE_INIT_FUNCTIONS]}.")


def _head_dim(source_config) -> int:
    # The rule every supported source uses (Llama, Qwen2/3 and nanochat fall back the same way).
    return getattr(source_config, "head_dim", None) or source_config.hidden_size // source_config.num_attention_heads


def convert_config(source_config) -> NanoVisionTextConfig:
    """The `NanoVisionTextConfig` of a model equivalent to one built from `source_config` (a transformers config of a
    supported architecture). Raises ValueError naming the source field when the block cannot express it."""
    arch = _architecture(source_config)
    _check_expressible(source_config, arch)
    rope_parameters = copy.deepcopy(dict(getattr(source_config, "rope_parameters", None) or {}))
    rope_parameters.setdefault("rope_type", "default")
    rope_parameters.setdefault("rope_theta", getattr(source_config, "rope_theta", NanoVisionTextConfig.default_theta))
    num_kv_heads = getattr(source_config, "num_key_value_heads", None) or source_config.num_attention_heads
    return NanoVisionTextConfig(
        vocab_size=source_config.vocab_size,
        hidden_size=source_config.hidden_size,
        intermediate_size=source_config.intermediate_size,
        num_hidden_layers=source_config.num_hidden_layers,
        num_attention_heads=source_config.num_attention_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=_head_dim(source_config),
        mlp_type=arch.mlp_type,
        max_position_embeddings=source_config.max_position_embeddings,
        rope_parameters=rope_parameters,
        rms_norm_eps=source_config.rms_norm_eps,
        embedding_norm=arch.embedding_norm,
        norm_weights=arch.norm_weights,
        qk_norm=arch.qk_norm,
        attention_bias=arch.qkv_bias,
        attention_dropout=float(getattr(source_config, "attention_dropout", 0.0) or 0.0),
        final_logit_softcapping=getattr(source_config, "final_logit_softcapping", None),
        tie_word_embeddings=bool(getattr(source_config, "tie_word_embeddings", False)),
        initializer_range=getattr(source_config, "initializer_range", 0.02),
        use_cache=getattr(source_config, "use_cache", True),
        bos_token_id=source_config.bos_token_id,
        eos_token_id=copy.deepcopy(source_config.eos_token_id),
        pad_token_id=source_config.pad_token_id,
    )


def _negate_second_half_of_each_head(tensor: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Negate output rows [h*D + D/2, (h+1)*D) of every head h of a q_proj/k_proj weight (or bias).

    Why this converts nanochat's rotary embedding into nanovision's. Split a head x = (x1, x2) into halves and let
    c, s be the cos/sin of the angles. nanovision (standard) rotates by +angle:
        R(x)  = (x1*c - x2*s,  x2*c + x1*s)
    nanochat's rotate_half is cat(x2, -x1), so it rotates by -angle:
        R'(x) = (x1*c + x2*s,  x2*c - x1*s)
    With F(x) = (x1, -x2), negating the second half:
        R(F(x)) = (x1*c + x2*s,  -x2*c + x1*s) = F(R'(x)).
    Negating those rows of q_proj/k_proj makes the projections output F(q), F(k), so nanovision computes
    F(R'(q)) . F(R'(k)) = R'(q) . R'(k): F flips the same coordinates of both and the signs cancel in every dot
    product. nanochat's QK-norm (after the rotation) is parameter-free and depends only on the RMS of each head,
    which neither F nor a rotation changes, so it may run before the rotation (nanovision's order) on F(q), F(k) and
    still give F of nanochat's normed, rotated q and k. Values and the rest of the block are untouched.
    """
    heads = tensor.shape[0] // head_dim
    flipped = tensor.detach().clone().reshape(heads, head_dim, *tensor.shape[1:])
    flipped[:, head_dim // 2:] *= -1
    return flipped.reshape(tensor.shape)


def _map_state_dict(source_model: PreTrainedModel, target: NanoVisionForCausalLM, arch: _Architecture) -> dict:
    """The target's full state dict, filled from the source's parameters through the architecture's renames."""
    source_state = source_model.state_dict()
    head_dim = target.config.head_dim
    mapped, used = {}, set()
    for target_key in target.state_dict():
        source_key = target_key
        for ours, theirs in arch.renames.items():
            source_key = source_key.replace(ours, theirs)
        if source_key not in source_state and target_key == "lm_head.weight" and target.config.tie_word_embeddings:
            source_key = "model.embed_tokens.weight"  # tied head saved without its own entry
        if source_key not in source_state:
            raise ValueError(
                f"{type(source_model).__name__} has no parameter {source_key!r} (for nanovision's {target_key!r}); "
                f"pass a *ForCausalLM model of a supported architecture."
            )
        tensor = source_state[source_key]
        if arch.flipped_rotary and (".self_attn.q_proj." in target_key or ".self_attn.k_proj." in target_key):
            tensor = _negate_second_half_of_each_head(tensor, head_dim)
        mapped[target_key] = tensor
        used.add(source_key)
    unused = sorted(set(source_state) - used)
    if unused:
        raise ValueError(f"{type(source_model).__name__} parameters with no place in nanovision: {unused[:8]}"
                         f"{' ...' if len(unused) > 8 else ''}")
    return mapped


@torch.no_grad()
def convert_from_transformers(model: PreTrainedModel) -> NanoVisionForCausalLM:
    """A `NanoVisionForCausalLM` computing the same logits as `model`, a transformers causal LM of a supported
    architecture (see `ARCHITECTURES`), in the same dtype and on the CPU."""
    arch = _architecture(model.config)
    config = convert_config(model.config)
    dtype = model.dtype
    attn_implementation = getattr(model.config, "_attn_implementation", None)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    # Build under the source dtype (non-persistent rotary tables stay float32, as in the source), skipping the
    # random init: every parameter is overwritten below.
    from transformers.initialization import no_init_weights

    with no_init_weights():
        target = NanoVisionForCausalLM._from_config(config, dtype=dtype, **kwargs)
    target.tie_weights()
    target.load_state_dict(_map_state_dict(model, target, arch), strict=True)
    if getattr(model, "generation_config", None) is not None:
        target.generation_config = copy.deepcopy(model.generation_config)
    return target.eval()


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def convert_checkpoint(src_dir, dst_dir, dtype=None) -> NanoVisionForCausalLM:
    """Convert the transformers checkpoint folder `src_dir` into a nanovision folder `dst_dir` that loads with
    `AutoModelForCausalLM.from_pretrained(dst_dir, trust_remote_code=True)` without nanovision installed.

    Args:
        src_dir: a local folder saved with `save_pretrained` (never downloaded).
        dst_dir: output folder (created).
        dtype: a torch dtype or its name ("bfloat16"); default: the dtype the checkpoint is stored in.

    The tokenizer is copied when `src_dir` has one. Returns the converted model.
    """
    if isinstance(dtype, str):
        name, dtype = dtype, getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"Unknown dtype {name!r}: pass a torch dtype name such as 'bfloat16'.")
    source = AutoModelForCausalLM.from_pretrained(src_dir, dtype=dtype or "auto", local_files_only=True)
    model = convert_from_transformers(source)
    del source

    NanoVisionTextConfig.register_for_auto_class()
    NanoVisionTextModel.register_for_auto_class("AutoModel")
    NanoVisionForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    model.config.auto_map = {**(getattr(model.config, "auto_map", None) or {}), **TEXT_AUTO_MAP}
    os.makedirs(dst_dir, exist_ok=True)
    model.save_pretrained(dst_dir)

    if any(os.path.isfile(os.path.join(src_dir, name)) for name in _TOKENIZER_FILES):
        AutoTokenizer.from_pretrained(src_dir, local_files_only=True).save_pretrained(dst_dir)
    return model


__all__ = ["ARCHITECTURES", "convert_config", "convert_from_transformers", "convert_checkpoint"]

"""nanovision: a nanochat-style GPT (rotary, GQA, QK-norm, SwiGLU or relu², RMSNorm, logit softcap) and a
SigLIP vision tower joined by a connector, as transformers models.

This file is shipped as Hub remote code: it imports only transformers, torch and its own configuration.
nanovision's fused kernels are an optional import; without them every op runs in plain PyTorch.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, SiglipPreTrainedModel, SiglipVisionConfig, SiglipVisionModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask, packed_sequence_mask_function
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple, logging
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_nanovision import NanoVisionConfig, NanoVisionTextConfig

try:
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # torch built without distributed
    FSDPModule = ()

try:  # nanovision installed: its Triton kernels can replace the eager ops (config.use_fused_kernels)
    from nanovision.kernels import apply_fused_kernels
except ImportError:  # remote code without nanovision: eager path only
    apply_fused_kernels = None

logger = logging.get_logger(__name__)

IGNORE_INDEX = -100  # the label the loss skips (prompts, images, padding): PyTorch's cross-entropy default


class NanoVisionRMSNorm(nn.Module):
    """RMSNorm with learnable weights (Llama) or none (nanochat).

    `forward(x, residual)` also adds the residual first and returns the sum, so the fused kernel can do
    both in one pass over memory.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, elementwise_affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size)) if elementwise_affine else None

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is not None:
            hidden_states = hidden_states + residual
        input_dtype = hidden_states.dtype
        x = hidden_states.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        normed = x.to(input_dtype)
        if self.weight is not None:
            normed = normed * self.weight
        return normed if residual is None else (normed, hidden_states)

    def extra_repr(self):
        return f"eps={self.eps}, weight={self.weight is not None}"


class NanoVisionRotaryEmbedding(nn.Module):
    """cos/sin tables for `position_ids`; any transformers rope type through `config.rope_parameters`."""

    inv_freq: torch.Tensor

    def __init__(self, config: NanoVisionTextConfig):
        super().__init__()
        self.config = config
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.rope_type = config.rope_parameters["rope_type"]
        rope_init_fn = self.compute_default_rope_parameters
        if self.rope_type != "default":
            rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = rope_init_fn(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: NanoVisionTextConfig, device=None, seq_len=None):
        base = config.rope_parameters["rope_theta"]
        dim = config.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x, position_ids):
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    """Rotate q [B, Hq, T, D] and k [B, Hk, T, D] by the angles in cos/sin [B, T, D]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class NanoVisionZeroInitLinear(nn.Linear):
    """A projection that writes into the residual stream (or the logits): nanochat initialises it to zero so every
    block starts as the identity and the first logits are uniform."""


class NanoVisionTextMLP(nn.Module):
    def __init__(self, config: NanoVisionTextConfig):
        super().__init__()
        self.mlp_type = config.mlp_type
        if self.mlp_type == "swiglu":
            self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = NanoVisionZeroInitLinear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        if self.mlp_type == "swiglu":
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.relu(self.up_proj(x)).square())


def project_qkv(attention: nn.Module, hidden_states: torch.Tensor):
    """The query, key and value projections of `hidden_states` [B, T, hidden] -> three [B, T, width] tensors."""
    return attention.q_proj(hidden_states), attention.k_proj(hidden_states), attention.v_proj(hidden_states)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, Hk, T, D] -> [B, Hk * n_rep, T, D], for the eager path only."""
    if n_rep == 1:
        return hidden_states
    batch, num_kv_heads, seq_len, head_dim = hidden_states.shape
    hidden_states = hidden_states[:, :, None].expand(batch, num_kv_heads, n_rep, seq_len, head_dim)
    return hidden_states.reshape(batch, num_kv_heads * n_rep, seq_len, head_dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Unpack[TransformersKwargs],
):
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class NanoVisionTextAttention(nn.Module):
    """Causal self-attention with GQA, optional QK-norm, rotary embedding; the backend comes from
    `config._attn_implementation` through transformers' attention interface."""

    def __init__(self, config: NanoVisionTextConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        q_width = config.num_attention_heads * self.head_dim
        kv_width = config.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_width, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_width, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_width, bias=config.attention_bias)
        self.o_proj = NanoVisionZeroInitLinear(q_width, config.hidden_size, bias=False)
        if config.qk_norm != "none":
            learnable = config.qk_norm == "learnable"
            self.q_norm = NanoVisionRMSNorm(self.head_dim, config.rms_norm_eps, elementwise_affine=learnable)
            self.k_norm = NanoVisionRMSNorm(self.head_dim, config.rms_norm_eps, elementwise_affine=learnable)
        # Plain function attributes so nanovision.kernels can swap in the fused rotary kernel and a single q/k/v GEMM
        # per instance; `qkv_rotary_fn(self, hidden_states, cos, sin)`, when set, does both in one step (without
        # QK-norm, which would sit between them).
        self.rotary_fn = apply_rotary_pos_emb
        self.qkv_fn = project_qkv
        self.qkv_rotary_fn = None

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        cos, sin = position_embeddings
        if self.qkv_rotary_fn is not None and self.config.qk_norm == "none":
            query_states, key_states, value_states = self.qkv_rotary_fn(self, hidden_states, cos, sin)
        else:
            query_states, key_states, value_states = self.qkv_fn(self, hidden_states)
            query_states = query_states.view(hidden_shape)
            key_states = key_states.view(hidden_shape)
            value_states = value_states.view(hidden_shape).transpose(1, 2)
            if self.config.qk_norm != "none":
                query_states = self.q_norm(query_states)
                key_states = self.k_norm(key_states)
            query_states, key_states = self.rotary_fn(query_states.transpose(1, 2), key_states.transpose(1, 2),
                                                      cos, sin)

        if past_key_values is not None:
            key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class NanoVisionDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: NanoVisionTextConfig, layer_idx: int):
        super().__init__()
        self.self_attn = NanoVisionTextAttention(config, layer_idx)
        self.mlp = NanoVisionTextMLP(config)
        self.input_layernorm = NanoVisionRMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_weights)
        self.post_attention_layernorm = NanoVisionRMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_weights)

    def forward(
        self,
        hidden_states: torch.Tensor,
        normed_hidden_states: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        next_norm: NanoVisionRMSNorm | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the residual stream after this layer, `next_norm` of it or None without one).

        `normed_hidden_states`: this layer's input norm of `hidden_states` when the layer before computed it, else
        None. `next_norm`: the norm that the output goes through next (the next layer's input norm, or the model's
        final norm); it runs here, on the last residual add, as one op.
        """
        if normed_hidden_states is None:
            normed_hidden_states = self.input_layernorm(hidden_states)
        attn_output, _ = self.self_attn(
            normed_hidden_states,
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            **kwargs,
        )
        # residual + attention, then norm: one op so the fused kernel reads the stream once
        mlp_input, residual = self.post_attention_layernorm(attn_output, hidden_states)
        mlp_output = self.mlp(mlp_input)
        if next_norm is None:
            return residual + mlp_output, None
        normed, residual = next_norm(mlp_output, residual)
        return residual, normed


def _wrapped(layer: nn.Module) -> bool:
    """Whether `layer` is wrapped (an FSDP unit, a checkpoint wrapper), so that its weights may be gathered only
    inside its own forward."""
    return isinstance(layer, FSDPModule) or not isinstance(layer, NanoVisionDecoderLayer)


class NanoVisionPreTrainedModel(PreTrainedModel):
    config: NanoVisionTextConfig
    config_class = NanoVisionTextConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["NanoVisionDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    _can_record_outputs = {
        "hidden_states": NanoVisionDecoderLayer,
        "attentions": NanoVisionTextAttention,
    }

    @torch.no_grad()
    def _init_weights(self, module):
        """nanochat's init: fan-in scaled normal projections, zero output projections (each block starts as the
        identity), unit-variance embeddings that the embedding norm rescales, zero untied output head."""
        config = self.config.get_text_config()
        if isinstance(module, NanoVisionZeroInitLinear):
            init.zeros_(module.weight)
        elif isinstance(module, nn.Linear):
            fan_out, fan_in = module.weight.shape
            init.normal_(module.weight, mean=0.0, std=min(1.0, math.sqrt(fan_out / fan_in)) / math.sqrt(fan_in))
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            unit_variance = config.embedding_norm and not config.tie_word_embeddings
            init.normal_(module.weight, mean=0.0, std=1.0 if unit_variance else config.initializer_range)
        else:  # norms, rotary tables
            super()._init_weights(module)


# ---------------------------------------------------------------------------- input validation
# Shapes and dtypes are checked on the host. Values are read where that costs no host-device synchronisation: CPU
# tensors directly; on an accelerator the check is queued on the device (a training step must not wait for it), so a
# failure there ends the process with a device-side assertion at the next synchronisation (rerun the batch on the CPU
# for the full message). Under torch.compile / torch.export value checks are left out: tracing cannot read values.


def check_values(condition: torch.Tensor, message: str, details: Callable[[], str] | None = None) -> None:
    """Raise ValueError(message) unless the one-element bool tensor `condition` holds; `details` (CPU only) adds
    what the values were."""
    if torch.compiler.is_compiling() or condition.device.type == "meta":
        return
    if condition.device.type != "cpu":
        # CUDA refuses an assert message of 255 characters or more (even for a condition that holds); the start names
        # the field, the CPU rerun gives the whole message
        torch._assert_async(condition, message[:254])
    elif not condition:
        raise ValueError(message if details is None else f"{details()}: {message}")


def check_integer_tensor(name: str, tensor: torch.Tensor, ndim: int, layout: str) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(tensor).__name__}.")
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers (torch.long), got {tensor.dtype}.")
    if tensor.ndim != ndim:
        hint = f"; add the batch dimension with {name}[None]" if tensor.ndim == ndim - 1 else ""
        raise ValueError(f"{name} must be {layout}, got shape {list(tensor.shape)}{hint}.")


def check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """input_ids: a non-empty [batch_size, sequence_length] integer tensor of ids in [0, vocab_size)."""
    check_integer_tensor("input_ids", input_ids, 2, "[batch_size, sequence_length]")
    if input_ids.numel() == 0:
        raise ValueError(f"input_ids is empty (shape {list(input_ids.shape)}): pass at least one row of one token.")
    low, high = torch.aminmax(input_ids)
    check_values(
        (low >= 0) & (high < vocab_size),
        f"input_ids must be token ids in [0, vocab_size={vocab_size}): encode with the model's own tokenizer "
        "(len(tokenizer) must not exceed the config's vocab_size) and replace ignore-index labels (-100) before "
        "using them as inputs",
        lambda: f"input_ids hold ids from {int(low)} to {int(high)}",
    )


def check_sequence_inputs(config: NanoVisionTextConfig, inputs_embeds: torch.Tensor, position_ids, attention_mask):
    """Host-side shape checks of the language model's inputs against `inputs_embeds` [batch, length, hidden]."""
    if not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.ndim != 3 or (
            inputs_embeds.shape[-1] != config.hidden_size):
        shape = list(inputs_embeds.shape) if isinstance(inputs_embeds, torch.Tensor) else type(inputs_embeds).__name__
        raise ValueError(
            f"inputs_embeds must be [batch_size, sequence_length, hidden_size={config.hidden_size}], got {shape}."
        )
    batch, length = inputs_embeds.shape[:2]
    if batch == 0 or length == 0:
        raise ValueError(f"inputs_embeds is empty (shape {list(inputs_embeds.shape)}): pass at least one token.")
    if position_ids is not None:
        check_integer_tensor("position_ids", position_ids, 2, "[batch_size, sequence_length]")
        if position_ids.shape[1] != length or position_ids.shape[0] not in (1, batch):
            raise ValueError(
                f"position_ids must be [batch_size, sequence_length] = [{batch}, {length}] (or [1, {length}], shared "
                f"by every row) like the inputs, got {list(position_ids.shape)}."
            )
    if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2 and (
            attention_mask.shape[0] != batch or attention_mask.shape[1] < length):
        raise ValueError(
            f"attention_mask (2D) must be [batch_size, past + sequence_length] with batch_size {batch} and at least "
            f"{length} columns, got {list(attention_mask.shape)}."
        )


# Normalised pixels, (x / 255 - mean) / std, lie in [-1, 1] with SigLIP's mean = std = 0.5 (NanoVisionImageProcessor's
# default) and within a few units for any usual mean/std; raw 0-255 values lie far beyond this bound.
PIXEL_VALUES_BOUND = 10.0


def check_pixel_values(pixel_values: torch.Tensor, vision_config: SiglipVisionConfig) -> None:
    """pixel_values: finite, normalised floats [num_images, channels, image_size, image_size]."""
    expected = (vision_config.num_channels, vision_config.image_size, vision_config.image_size)
    fix = "preprocess images with NanoVisionImageProcessor (or the checkpoint's AutoProcessor)"
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}: {fix}.")
    if not pixel_values.dtype.is_floating_point:
        raise TypeError(f"pixel_values must be rescaled and normalised floats, got {pixel_values.dtype}: {fix}.")
    if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
        raise ValueError(
            f"pixel_values must have shape [num_images, {', '.join(map(str, expected))}], got "
            f"{list(pixel_values.shape)}; {fix}."
        )
    if pixel_values.numel():
        largest = pixel_values.detach().abs().amax()
        check_values(  # NaN fails the comparison too
            largest <= PIXEL_VALUES_BOUND,
            f"pixel_values must be finite and normalised (|x| <= {PIXEL_VALUES_BOUND:g}): {fix}, which rescales "
            "by 1/255 and normalises; NaN or inf means the batch is corrupt upstream",
            lambda: f"pixel_values reach {float(largest):g}" if largest.isfinite() else "pixel_values hold NaN or inf",
        )


def document_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """Where a document starts, per row of `position_ids` [B, T] (bool): at the row's first token and wherever the
    position does not follow the previous one (transformers' rule for packed rows)."""
    previous = torch.cat([position_ids[:, :1], position_ids[:, :-1]], dim=-1)  # the first token follows no token
    return position_ids != previous + 1


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Index of the document each token belongs to, per row of `position_ids` [B, T] (transformers' own helper also
    asks the device whether any row is packed at all, a synchronisation this avoids)."""
    return document_starts(position_ids).cumsum(-1) - 1


def padded_documents_mask(config: NanoVisionTextConfig, position_ids: torch.Tensor, attention_mask: torch.Tensor):
    """The document mask of packed `position_ids`, to intersect with the causal and padding masks: transformers
    reads the documents from position_ids only when no attention_mask is given, and otherwise lets the documents of
    a row attend to each other. Flash attention applies a padding mask and ignores documents, so there a row must
    hold one document (plus padding)."""
    documents = document_ids(position_ids)
    if "flash" in config._attn_implementation:
        real = attention_mask.bool()
        first = documents.masked_fill(~real, documents.shape[-1]).amin(-1)
        last = documents.masked_fill(~real, -1).amax(-1)
        check_values(
            (last <= first).all(),
            f"attn_implementation={config._attn_implementation!r} applies the attention_mask and ignores the packed "
            "documents of position_ids: pass no attention_mask with packed rows (pad with position_ids restarting "
            "at 0, as PackedDataCollator does), or use sdpa, flex_attention or nanovision_varlen",
        )
    return packed_sequence_mask_function(documents)


# the attention implementations whose packed rows check_packed_rows knows (and flash_attention_*)
PACKING_IMPLEMENTATIONS = ("eager", "sdpa", "flex_attention", "nanovision_varlen")
PACKED_ROWS_RULE = ("a packed row's documents start at its first token and wherever position_ids restart at 0, and "
                    "count up by one inside each document (as PackedDataCollator builds them)")


def check_packed_rows(config: NanoVisionTextConfig, position_ids: torch.Tensor, attention_mask, kwargs: dict) -> None:
    """Each attention implementation finds a packed row's documents its own way: sdpa, eager and flex_attention from
    the steps of position_ids, nanovision_varlen from its restarts at 0, flash attention from the `cu_seq_lens_q`
    kwargs or, for one row, from the positions equal to the row's smallest. Rows that follow PACKED_ROWS_RULE mean
    the same documents to all of them; anything else would attend across documents (or drop tokens) on some
    backend without a word, so it is refused. `position_ids` [B, T] as the layers get them, no cache behind them."""
    implementation = config._attn_implementation
    flash = implementation.startswith("flash")
    if not flash and implementation not in PACKING_IMPLEMENTATIONS:
        return  # a serving engine's own attention (vLLM's, paged) lays out its sequences its own way
    if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2:
        return  # the padding mask decides what is a token; padded_documents_mask checks its rows
    # eager, sdpa and flex_attention take their mask from position_ids alone
    bounds = kwargs.get("cu_seq_lens_q") if flash or implementation == "nanovision_varlen" else None
    fix = "build them from position_ids (PackedDataCollator(return_flash_attn_kwargs=True))"
    if bounds is not None:
        for name in ("cu_seq_lens_k", "max_length_q", "max_length_k"):
            if kwargs.get(name) is None:
                raise ValueError(f"cu_seq_lens_q is given but {name} is not: pass all four; {fix}.")
        if not isinstance(bounds, torch.Tensor) or bounds.ndim != 1 or bounds.numel() < 2 or (
                bounds.dtype.is_floating_point or bounds.dtype == torch.bool):
            raise ValueError(f"cu_seq_lens_q must be a 1-D integer tensor [num_documents + 1]; {fix}.")
        if bounds.device != position_ids.device:
            raise ValueError(f"cu_seq_lens_q is on {bounds.device}, the inputs on {position_ids.device}; {fix}.")
        for name in ("max_length_q", "max_length_k"):
            if isinstance(kwargs[name], bool) or not isinstance(kwargs[name], (int, torch.SymInt)):
                raise ValueError(f"{name} must be an int (the longest document), got {type(kwargs[name]).__name__}; "
                                 f"{fix}.")
        if not isinstance(kwargs["cu_seq_lens_k"], torch.Tensor) or kwargs["cu_seq_lens_k"].shape != bounds.shape:
            raise ValueError(f"cu_seq_lens_k must equal cu_seq_lens_q (self-attention over the same documents); {fix}.")
    if torch.compiler.is_compiling():
        return  # check_values is a no-op there: build none of its conditions

    batch, length = position_ids.shape
    starts = document_starts(position_ids)
    check_values((~starts[:, 1:] | (position_ids[:, 1:] == 0)).all(),
                 f"position_ids jump inside a row: {PACKED_ROWS_RULE}")
    if bounds is None:
        if flash:
            # transformers reads documents off position_ids only for a single row, and there from its smallest value
            packed = starts[:, 1:].any()
            check_values(
                ~packed if batch > 1 else ~packed | (position_ids[0, 0] == 0),
                f"attn_implementation={implementation!r} sees the documents of several packed rows only through "
                "cu_seq_lens_q / cu_seq_lens_k and max_length_q / max_length_k: pass them "
                "(PackedDataCollator(return_flash_attn_kwargs=True)), or one row starting at position 0, or use "
                "nanovision_varlen, sdpa or flex_attention",
            )
        return
    lengths = bounds[1:] - bounds[:-1]
    # where documents start by the bounds, over the flattened B * T tokens (a bound out of range lands on the end)
    marked = torch.zeros(batch * length + 1, dtype=torch.bool, device=position_ids.device)
    marked[bounds[:-1].long().clamp(0, batch * length)] = True
    check_values(
        (bounds[0] == 0) & (bounds[-1] == batch * length) & (lengths > 0).all()
        & (lengths.amax() <= min(kwargs["max_length_q"], kwargs["max_length_k"]))
        & (kwargs["cu_seq_lens_k"].to(bounds.device) == bounds).all() & (marked[:-1] == starts.reshape(-1)).all()
        & ~marked[-1],
        f"cu_seq_lens_q / max_length_q do not describe the documents of position_ids ({batch} x {length} tokens; "
        f"{PACKED_ROWS_RULE}, max_length_q at least the longest); {fix}",
    )


class NanoVisionTextModel(NanoVisionPreTrainedModel):
    def __init__(self, config: NanoVisionTextConfig):
        super().__init__(config)
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.embedding_norm:
            self.embedding_norm = NanoVisionRMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_weights)
        self.layers = nn.ModuleList(
            [NanoVisionDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = NanoVisionRMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_weights)
        self.rotary_emb = NanoVisionRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if inputs_embeds is None:
            check_token_ids(input_ids, self.config.vocab_size)
            inputs_embeds = self.embed_tokens(input_ids)
        check_sequence_inputs(self.config, inputs_embeds, position_ids, attention_mask)
        # A cache created by this call holds no past, so the mask must not depend on it: transformers detects packed
        # rows (position_ids restarting at 0, no attention_mask) only when no cache is given.
        past_for_mask = past_key_values
        # Rows that are neither padded nor packed (no attention_mask, no position_ids, no past) are plain causal rows,
        # for which SDPA needs no mask (is_causal). transformers finds that eagerly, but under torch.compile before
        # torch 2.14 it cannot and builds a [T, T] mask, which keeps SDPA off its fastest kernels.
        plain_causal_sdpa = (attention_mask is None and position_ids is None and past_for_mask is None
                             and self.config._attn_implementation == "sdpa")
        documents_mask = None
        if (past_for_mask is None and position_ids is not None and isinstance(attention_mask, torch.Tensor)
                and attention_mask.ndim == 2):
            documents_mask = padded_documents_mask(
                self.config, position_ids.expand(inputs_embeds.shape[0], -1), attention_mask)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen_tokens = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)
        if past_for_mask is None:
            check_packed_rows(self.config, position_ids.expand(inputs_embeds.shape[0], -1), attention_mask, kwargs)

        # Packed rows get a block-diagonal causal mask here; flash_attention_2 instead needs the cu_seq_lens kwargs
        # (PackedDataCollator(return_flash_attn_kwargs=True)) for batches of more than one row.
        causal_mask = None if plain_causal_sdpa else create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=past_for_mask,
            position_ids=position_ids,
            and_mask_function=documents_mask,
        )
        hidden_states = inputs_embeds
        if self.config.embedding_norm:
            hidden_states = self.embedding_norm(hidden_states)
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        layers = self.layers[: self.config.num_hidden_layers]
        # Each layer runs the norm that its output goes through next (the next layer's input norm, the final norm
        # after the last layer) together with its last residual add: one pass over the stream instead of two, and in
        # the backward the stream's two gradients are summed in that pass too. Not where layers are wrapped.
        share_norms = not any(_wrapped(layer) for layer in layers)
        normed = None
        for index, decoder_layer in enumerate(layers):
            next_norm = None
            if share_norms:
                next_norm = layers[index + 1].input_layernorm if index + 1 < len(layers) else self.norm
            hidden_states, normed = decoder_layer(
                hidden_states,
                normed,
                position_embeddings=position_embeddings,
                attention_mask=causal_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                next_norm=next_norm,
                **kwargs,
            )
        last_hidden_state = self.norm(hidden_states) if normed is None else normed
        return BaseModelOutputWithPast(last_hidden_state=last_hidden_state, past_key_values=past_key_values)


def softcap_logits(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    return logits if cap is None else cap * torch.tanh(logits / cap)


def shifted_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Target of position t is the token at t + 1; the last position has none."""
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def make_lm_head(config: NanoVisionTextConfig) -> nn.Linear:
    # A tied head shares the embedding, which must not be zeroed.
    linear = nn.Linear if config.tie_word_embeddings else NanoVisionZeroInitLinear
    return linear(config.hidden_size, config.vocab_size, bias=False)


def maybe_apply_fused_kernels(model: nn.Module, config: NanoVisionTextConfig) -> None:
    ops = config.fused_kernel_ops
    if not ops:
        return
    if apply_fused_kernels is None:
        logger.warning_once("use_fused_kernels is set but nanovision is not installed: running the eager ops.")
        return
    # use_fused_kernels=True: every op that applies (a text model has no LayerNorm); a list names each op it wants
    apply_fused_kernels(model, ops=None if config.use_fused_kernels is True else ops)


class NanoVisionForCausalLM(NanoVisionPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: NanoVisionTextConfig):
        super().__init__(config)
        self.model = NanoVisionTextModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = make_lm_head(config)
        # Set by nanovision.kernels to the fused linear + cross-entropy op: training then never builds the logits.
        self.linear_cross_entropy = None
        self.post_init()
        maybe_apply_fused_kernels(self, config)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        loss, logits = causal_lm_loss_and_logits(self, outputs.last_hidden_state, labels, logits_to_keep, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


def causal_lm_loss_and_logits(model, hidden_states, labels, logits_to_keep, **kwargs):
    """Head + loss shared by the text and vision-language models.

    Training with the fused linear cross-entropy returns no logits: they are never built."""
    config = model.config.get_text_config()
    cap = config.final_logit_softcapping
    if labels is not None and model.training and model.linear_cross_entropy is not None:
        targets = kwargs.get("shift_labels")
        if targets is None:
            targets = shifted_labels(labels)
        weight = model.lm_head.weight
        device_type = hidden_states.device.type
        if torch.is_autocast_enabled(device_type):  # what autocast would do to the lm_head matmul
            dtype = torch.get_autocast_dtype(device_type)
            hidden_states, weight = hidden_states.to(dtype), weight.to(dtype)
        loss = model.linear_cross_entropy(
            hidden_states.reshape(-1, hidden_states.shape[-1]),
            weight,
            targets.reshape(-1).to(hidden_states.device),
            ignore_index=IGNORE_INDEX,
            reduction="mean",
            softcap=cap,
            num_items_in_batch=kwargs.get("num_items_in_batch"),
        )
        return loss, None
    slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
    logits = softcap_logits(model.lm_head(hidden_states[:, slice_indices, :]), cap)
    loss = None
    if labels is not None:
        loss = model.loss_function(logits=logits, labels=labels, vocab_size=config.vocab_size, **kwargs)
    return loss, logits


def require_all_weights(checkpoint: str, loading_info: dict) -> None:
    """Refuse a checkpoint that lacks weights of the model built from it: they would be random, silently."""
    missing = sorted(loading_info["missing_keys"])
    if missing:
        listed = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"{checkpoint} lacks {len(missing)} weights the model needs ({listed}): it is not a "
                         "checkpoint of this kind of model, or it is incomplete.")


# ---------------------------------------------------------------------------- vision-language model


class NanoVisionPixelShuffleConnector(nn.Module):
    """Space-to-depth by r (each r x r block of patches becomes one token r² times wider), then an MLP into the
    language model's width: (image_size / patch_size)² / r² tokens per image."""

    def __init__(self, config: NanoVisionConfig):
        super().__init__()
        self.factor = config.pixel_shuffle_factor
        vision_width = config.vision_config.hidden_size * self.factor**2
        text_width = config.text_config.hidden_size
        self.linear_1 = nn.Linear(vision_width, text_width)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(text_width, text_width)
        # The language model sees the token grid flattened row by row; a learned embedding per grid cell, in its
        # own width, tells it where each token sits without its having to infer the row length from rotary phases.
        self.position_embedding = None
        if config.connector_position_embedding:
            self.position_embedding = nn.Parameter(torch.zeros(config.num_image_tokens, text_width))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        num_images, num_patches, width = patches.shape
        side, r = math.isqrt(num_patches), self.factor
        grid = patches.reshape(num_images, side // r, r, side // r, r, width)
        tokens = grid.permute(0, 1, 3, 2, 4, 5).reshape(num_images, (side // r) ** 2, r * r * width)
        tokens = self.linear_2(self.act(self.linear_1(tokens)))
        return tokens if self.position_embedding is None else tokens + self.position_embedding.to(tokens.dtype)


class NanoVisionPerceiverLayer(nn.Module):
    """Learned queries cross-attend to [patches; queries], then an MLP; pre-norm residual blocks."""

    def __init__(self, width: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.norm_queries = nn.LayerNorm(width, eps=eps)
        self.norm_context = nn.LayerNorm(width, eps=eps)
        self.q_proj = nn.Linear(width, width)
        self.kv_proj = nn.Linear(width, 2 * width)
        self.o_proj = nn.Linear(width, width)
        self.norm_mlp = nn.LayerNorm(width, eps=eps)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, queries: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        batch, num_queries, width = queries.shape
        normed_queries = self.norm_queries(queries)
        context = torch.cat([self.norm_context(patches), normed_queries], dim=1)
        heads = lambda x: x.reshape(batch, x.shape[1], self.num_heads, -1).transpose(1, 2)  # noqa: E731
        keys, values = self.kv_proj(context).chunk(2, dim=-1)
        attended = F.scaled_dot_product_attention(heads(self.q_proj(normed_queries)), heads(keys), heads(values))
        queries = queries + self.o_proj(attended.transpose(1, 2).reshape(batch, num_queries, width))
        return queries + self.mlp(self.norm_mlp(queries))


class NanoVisionPerceiverConnector(nn.Module):
    """A fixed number of learned queries resample any number of patches, then an MLP into the LM's width."""

    def __init__(self, config: NanoVisionConfig):
        super().__init__()
        width = config.vision_config.hidden_size
        eps = config.vision_config.layer_norm_eps
        self.queries = nn.Parameter(torch.zeros(config.perceiver_num_queries, width))
        self.layers = nn.ModuleList(
            [NanoVisionPerceiverLayer(width, config.perceiver_num_heads, eps) for _ in range(config.perceiver_num_layers)]
        )
        self.norm = nn.LayerNorm(width, eps=eps)
        self.linear_1 = nn.Linear(width, config.text_config.hidden_size)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(config.text_config.hidden_size, config.text_config.hidden_size)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        queries = self.queries.unsqueeze(0).expand(patches.shape[0], -1, -1)
        for layer in self.layers:
            queries = layer(queries, patches)
        return self.linear_2(self.act(self.linear_1(self.norm(queries))))


CONNECTORS = {"pixel_shuffle": NanoVisionPixelShuffleConnector, "perceiver": NanoVisionPerceiverConnector}


@dataclass
class NanoVisionModelOutputWithPast(BaseModelOutputWithPast):
    """`image_hidden_states`: the connector's output, [num_images, num_image_tokens, hidden_size]."""

    image_hidden_states: torch.FloatTensor | None = None


@dataclass
class NanoVisionCausalLMOutputWithPast(CausalLMOutputWithPast):
    image_hidden_states: torch.FloatTensor | None = None


class NanoVisionMultimodalPreTrainedModel(NanoVisionPreTrainedModel):
    config: NanoVisionConfig
    config_class = NanoVisionConfig
    input_modalities = ("image", "text")
    _no_split_modules = ["NanoVisionDecoderLayer", "SiglipEncoderLayer"]

    def post_init(self):
        super().post_init()
        # post_init adds the children's _no_split_modules, and SigLIP's names classes of the whole SigLIP model (text
        # embeddings, pooling head) that this one lacks; Accelerate's FSDP auto-wrap reads this list and fails on a
        # class it cannot find.
        self._no_split_modules = self._no_split_modules & {type(module).__name__ for module in self.modules()}

    @torch.no_grad()
    def initialize_weights(self):
        """The vision tower's weights missing from a checkpoint get SigLIP's init, as in a new SiglipVisionModel.
        transformers skips, for models outside its tree, every module whose own parameters are all loaded, which
        includes modules with none of their own, such as SiglipAttention and SiglipMLP, whose init sets their
        projections; SiglipPreTrainedModel's init then runs on those modules here. transformers' init functions leave
        loaded weights as they are."""
        tower = self.base_model.vision_tower
        pending = [module for module in tower.modules() if not getattr(module, "_is_hf_initialized", False)]
        super().initialize_weights()
        for module in reversed(pending):  # children before their parents, as transformers initialises
            SiglipPreTrainedModel._init_weights(tower, module)

    @torch.no_grad()
    def _init_weights(self, module):
        if isinstance(module, NanoVisionPerceiverConnector):
            init.normal_(module.queries, mean=0.0, std=module.queries.shape[-1] ** -0.5)
        else:
            super()._init_weights(module)


def place_image_features(inputs_embeds: torch.Tensor, image_mask: torch.Tensor, image_features: torch.Tensor):
    """inputs_embeds [B, T, H] with the placeholders of `image_mask` [B, T] replaced, in reading order, by the rows of
    `image_features` [num_images, tokens, H]. A gather where masked_scatter would do: masked_scatter's backward asks
    the device how many tokens the mask holds, a synchronisation per training step."""
    features = image_features.reshape(-1, image_features.shape[-1])
    index = (image_mask.reshape(-1).cumsum(0) - 1).clamp(min=0)  # the feature row of each placeholder
    placed = features.index_select(0, index).view_as(inputs_embeds)
    return torch.where(image_mask.unsqueeze(-1), placed, inputs_embeds)


class NanoVisionModel(NanoVisionMultimodalPreTrainedModel):
    """SigLIP vision tower -> connector -> language model. Image embeddings replace the `<image>` placeholder
    tokens wherever they stand in the text; returns the language model's hidden states."""

    def __init__(self, config: NanoVisionConfig):
        super().__init__(config)
        self.vision_tower = SiglipVisionModel(config.vision_config)
        self.multi_modal_projector = CONNECTORS[config.connector_type](config)
        self.language_model = NanoVisionTextModel(config.text_config)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.embed_tokens

    def set_input_embeddings(self, value):
        self.language_model.embed_tokens = value

    @can_return_tuple
    def get_image_features(self, pixel_values: torch.FloatTensor, output_hidden_states: bool | None = None,
                           output_attentions: bool | None = None, **kwargs) -> BaseModelOutputWithPooling:
        """Vision tower + connector. `pooler_output` holds the image embeddings the language model sees,
        [num_images, num_image_tokens, text hidden_size]; `hidden_states` / `attentions` are the tower's, when asked
        for; `return_dict=False` gives the tuple."""
        check_pixel_values(pixel_values, self.config.vision_config)
        layer = self.config.vision_feature_layer
        vision_outputs = self.vision_tower(
            pixel_values.to(self.vision_tower.dtype),
            output_hidden_states=bool(output_hidden_states) or layer != -1,
            output_attentions=output_attentions,
            return_dict=True,
        )
        patches = vision_outputs.last_hidden_state if layer == -1 else vision_outputs.hidden_states[layer]
        return BaseModelOutputWithPooling(
            last_hidden_state=vision_outputs.last_hidden_state,
            pooler_output=self.multi_modal_projector(patches),
            hidden_states=vision_outputs.hidden_states if output_hidden_states else None,  # else only for the layer
            attentions=vision_outputs.attentions,
        )

    def get_placeholder_mask(self, input_ids: torch.LongTensor | None, inputs_embeds: torch.FloatTensor):
        """[batch, length] True at the `<image>` placeholders: from input_ids, or else where inputs_embeds hold the
        placeholder's embedding (inputs built with `get_input_embeddings()(input_ids)`)."""
        if input_ids is not None:
            return input_ids == self.config.image_token_id
        image_token = torch.tensor(self.config.image_token_id, device=inputs_embeds.device)
        return (inputs_embeds == self.get_input_embeddings()(image_token).to(inputs_embeds.dtype)).all(-1)

    def check_image_tokens(self, image_mask: torch.Tensor, num_images: int) -> None:
        per_image = self.config.num_image_tokens
        num_tokens = image_mask.sum()

        def details():
            count = int(num_tokens)
            if count % per_image == 0:
                return (f"Got {num_images} images but {count // per_image} <image> placeholders "
                        f"({count} image tokens, {per_image} per image)")
            return (f"the inputs hold {count} image tokens (id {self.config.image_token_id}), which is not "
                    f"{num_images} images x {per_image} tokens per image")

        check_values(
            num_tokens == num_images * per_image,
            f"the inputs must hold {per_image} <image> tokens (id {self.config.image_token_id}) per image, "
            f"{num_images} images given: pass one image per placeholder and build inputs with NanoVisionProcessor",
            details,
        )

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> NanoVisionModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if inputs_embeds is None:
            check_token_ids(input_ids, self.config.text_config.vocab_size)
            inputs_embeds = self.get_input_embeddings()(input_ids)
        image_features = None
        if pixel_values is not None:
            image_features = self.get_image_features(pixel_values).pooler_output
            image_mask = self.get_placeholder_mask(input_ids, inputs_embeds)
            if past_key_values is not None and image_mask.shape[0] == 1:
                # Generating one row (as assisted decoding and prompt lookup do): tokens after the prompt, drafted or
                # copied from it, may hold the placeholder id; the images fill the prompt's placeholders, the first.
                num_image_tokens = image_features.shape[0] * self.config.num_image_tokens
                image_mask = image_mask & (image_mask.cumsum(-1) <= num_image_tokens)
            self.check_image_tokens(image_mask, image_features.shape[0])
            if image_features.shape[0]:
                inputs_embeds = place_image_features(inputs_embeds, image_mask.to(inputs_embeds.device),
                                                     image_features.to(inputs_embeds.device, inputs_embeds.dtype))
        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        return NanoVisionModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=image_features,
        )


class NanoVisionForConditionalGeneration(NanoVisionMultimodalPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: NanoVisionConfig):
        super().__init__(config)
        self.model = NanoVisionModel(config)
        self.lm_head = make_lm_head(config.text_config)
        self.linear_cross_entropy = None  # see NanoVisionForCausalLM
        self.post_init()
        maybe_apply_fused_kernels(self, config.text_config)

    def get_output_embeddings(self):
        return self.lm_head

    def get_image_features(self, pixel_values: torch.FloatTensor, output_hidden_states: bool | None = None,
                           output_attentions: bool | None = None, **kwargs) -> BaseModelOutputWithPooling:
        return self.model.get_image_features(pixel_values, output_hidden_states=output_hidden_states,
                                             output_attentions=output_attentions, **kwargs)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, inputs_embeds=None,
                                      pixel_values=None, is_first_iteration: bool | None = False, **kwargs):
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, past_key_values=past_key_values, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
            pixel_values=pixel_values, is_first_iteration=is_first_iteration, **kwargs)
        if is_first_iteration and model_inputs.get("pixel_values") is None:
            # generate always passes a cache, against which forward accepts placeholders without images: the prompt
            # must bring its own (an assistant model's prefill is no first iteration and goes without them)
            embeds = model_inputs.get("inputs_embeds")
            self.model.check_image_tokens(self.model.get_placeholder_mask(model_inputs.get("input_ids"), embeds), 0)
        return model_inputs

    @property
    def trainable_parts(self) -> dict[str, list[nn.Module]]:
        """The three groups training stages freeze or give their own learning rate."""
        return {
            "vision_tower": [self.model.vision_tower],
            "connector": [self.model.multi_modal_projector],
            "language_model": [self.model.language_model, self.lm_head],
        }

    def set_trainable(self, vision_tower: bool | None = None, connector: bool | None = None,
                      language_model: bool | None = None) -> "NanoVisionForConditionalGeneration":
        """Freeze (False) or unfreeze (True) each part; None leaves it as it is."""
        wanted = {"vision_tower": vision_tower, "connector": connector, "language_model": language_model}
        for part, modules in self.trainable_parts.items():
            if wanted[part] is not None:
                for module in modules:
                    module.requires_grad_(wanted[part])
        return self

    @classmethod
    def from_pretrained_components(cls, text: str, vision: str, **config_kwargs) -> "NanoVisionForConditionalGeneration":
        """Assemble a VLM from the language model of a nanovision checkpoint (a text model, or a VLM whose language
        model is taken) and a SigLIP checkpoint (a SiglipModel or SiglipVisionModel folder or Hub id); the connector
        starts freshly initialised. A checkpoint of another kind, or one that lacks weights, is refused."""
        text_type = PretrainedConfig.get_config_dict(text)[0].get("model_type")
        text_classes = {"nanovision_text": NanoVisionForCausalLM, "nanovision": NanoVisionForConditionalGeneration}
        if text_type not in text_classes:
            raise ValueError(
                f"from_pretrained_components(text={text!r}): a {text_type!r} checkpoint; text must be a nanovision "
                "text model (model_type 'nanovision_text') or a nanovision VLM (model_type 'nanovision'), whose "
                "language model is taken."
            )
        vision_type = PretrainedConfig.get_config_dict(vision)[0].get("model_type")
        if vision_type not in ("siglip", "siglip_vision_model"):
            raise ValueError(
                f"from_pretrained_components(vision={vision!r}): a {vision_type!r} checkpoint; vision must be a SigLIP "
                "checkpoint (model_type 'siglip' or 'siglip_vision_model'), e.g. google/siglip-base-patch16-224."
            )
        language, info = text_classes[text_type].from_pretrained(text, output_loading_info=True)
        require_all_weights(text, info)
        vision_config = SiglipVisionConfig.from_pretrained(vision)
        vision_config.vision_use_head = False
        tower, info = SiglipVisionModel.from_pretrained(vision, config=vision_config, output_loading_info=True)
        require_all_weights(vision, info)
        model = cls.from_text_model(language, tower.config, **config_kwargs)
        model.model.vision_tower.load_state_dict(tower.state_dict())
        return model

    @classmethod
    def from_text_model(cls, language: "NanoVisionForCausalLM | NanoVisionForConditionalGeneration",
                        vision_config: SiglipVisionConfig, **config_kwargs) -> "NanoVisionForConditionalGeneration":
        """A VLM around a trained nanovision language model (a text model, or a VLM's); the vision tower and the
        connector start freshly initialised."""
        if isinstance(language, NanoVisionForCausalLM):
            text_config, text_model = language.config, language.model
        elif isinstance(language, NanoVisionForConditionalGeneration):
            text_config, text_model = language.config.text_config, language.model.language_model
        else:
            raise TypeError(
                "from_text_model needs a NanoVisionForCausalLM (or a NanoVisionForConditionalGeneration, whose "
                f"language model is taken), got {type(language).__name__}; load it with AutoModelForCausalLM."
            )
        if not isinstance(vision_config, SiglipVisionConfig):
            raise TypeError(f"from_text_model needs a SiglipVisionConfig, got {type(vision_config).__name__}.")
        model = cls(NanoVisionConfig(text_config=text_config, vision_config=vision_config, **config_kwargs))
        model.model.language_model.load_state_dict(text_model.state_dict())
        model.lm_head.load_state_dict(language.lm_head.state_dict())
        return model

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> NanoVisionCausalLMOutputWithPast:
        if pixel_values is None and past_key_values is None:
            # Without a cache the images cannot be elsewhere. With one, placeholders may come without their images,
            # as in-tree VLMs allow: an assistant model in assisted generation runs its prefill so, and a decoding
            # step may hold a generated placeholder id (generate checks the prompt itself). The base model does not
            # check, as in-tree VLMs do not: vLLM's Transformers backend runs it on text-only batches whose prompts
            # vLLM has validated, and an error there would stop the engine for every request.
            self.model.check_image_tokens(self.model.get_placeholder_mask(input_ids, inputs_embeds), 0)
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        loss, logits = causal_lm_loss_and_logits(self, outputs.last_hidden_state, labels, logits_to_keep, **kwargs)
        return NanoVisionCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states,
        )


__all__ = [
    "NanoVisionPreTrainedModel",
    "NanoVisionTextModel",
    "NanoVisionForCausalLM",
    "NanoVisionModel",
    "NanoVisionForConditionalGeneration",
]

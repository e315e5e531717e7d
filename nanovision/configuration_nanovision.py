"""Configurations of nanovision: the nanochat-style text model and the composite vision-language model.

Written like transformers 5.x's own configs: typed dataclass fields checked by huggingface_hub's `@strict` (type and
range, on construction and on every assignment) and `validate_*` methods for what spans several fields (run on
construction and again by `save_pretrained`, so a config mutated into an invalid state is never written). This file is
shipped next to the model as Hub remote code, so it imports only transformers and its own dependency huggingface_hub.
"""

import math
from typing import Literal

from huggingface_hub.dataclasses import as_validated_field, strict
from transformers import PreTrainedConfig, SiglipVisionConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.utils.type_validators import interval, positive_int_field

FUSED_KERNEL_OPS = ("rms_norm", "swiglu", "rope", "linear_cross_entropy", "layer_norm")

# Where the remote code of each config lives in a saved checkpoint. AutoModel must name the base model: vLLM's
# Transformers backend builds it with AutoModel.from_config.
TEXT_AUTO_MAP = {
    "AutoConfig": "configuration_nanovision.NanoVisionTextConfig",
    "AutoModel": "modeling_nanovision.NanoVisionTextModel",
    "AutoModelForCausalLM": "modeling_nanovision.NanoVisionForCausalLM",
}
VLM_AUTO_MAP = {
    "AutoConfig": "configuration_nanovision.NanoVisionConfig",
    "AutoModel": "modeling_nanovision.NanoVisionModel",
    "AutoModelForImageTextToText": "modeling_nanovision.NanoVisionForConditionalGeneration",
}


@as_validated_field
def positive_number_or_none(value):
    if value is not None and not value > 0:
        raise ValueError(f"Value must be a number > 0 or None, got {value!r}.")


@as_validated_field
def fused_kernel_selection(value):
    unknown = [] if isinstance(value, bool) else [op for op in value if op not in FUSED_KERNEL_OPS]
    if unknown:
        raise ValueError(f"Unknown ops {unknown}: use True, False or a list of ops from {list(FUSED_KERNEL_OPS)}.")


@strict
class NanoVisionTextConfig(PreTrainedConfig):
    r"""Configuration of the nanovision language model (a nanochat-style GPT).

    One config expresses both a Llama-style block (SwiGLU, learnable RMSNorm weights) and nanochat's block
    (relu², parameter-free norms, norm after the token embedding, QK-norm, logit softcap).

    Args:
        vocab_size: number of tokens.
        hidden_size: residual stream width.
        intermediate_size: MLP width (defaults to 4 * hidden_size).
        num_hidden_layers: number of transformer blocks.
        num_attention_heads: query heads.
        num_key_value_heads: key/value heads; equal to `num_attention_heads` for MHA, 1 for MQA, a divisor for GQA.
        head_dim: width of one head, even (defaults to hidden_size // num_attention_heads).
        mlp_type: "swiglu" (down(silu(gate(x)) * up(x))) or "relu2" (down(relu(up(x))**2)).
        max_position_embeddings: longest sequence the rotary tables are sized for.
        rope_parameters: transformers' standard rotary dict, e.g. {"rope_type": "default", "rope_theta": 10000.0};
            any rope type of transformers' `ROPE_INIT_FUNCTIONS`, rotating the whole head.
        rms_norm_eps: epsilon of every RMSNorm.
        embedding_norm: apply an RMSNorm right after the token embedding (nanochat).
        norm_weights: RMSNorms have learnable weights (Llama) or none (nanochat).
        qk_norm: "none", "parameter_free" (nanochat) or "learnable" (per-head weights, Qwen3-style); applied
            to queries and keys before the rotary embedding.
        attention_bias: bias on the q/k/v projections (Qwen2-style); the output projection never has one.
        attention_dropout: dropout on attention probabilities, in [0, 1).
        final_logit_softcapping: if set, logits = c * tanh(logits / c).
        tie_word_embeddings: share the token embedding and the output head.
        initializer_range: std of the normal init of embeddings and projections.
        use_fused_kernels: False, True (all ops) or a list of ops from FUSED_KERNEL_OPS to run with nanovision's
            fused kernels (nanovision.kernels.apply_fused_kernels): "rms_norm" (the norms), "swiglu" (the MLP's
            activation and down projection, swiglu or relu2), "rope" (the rotary embedding, q/k/v as one GEMM),
            "linear_cross_entropy" (the head and the training loss without logits) and "layer_norm" (the vision
            tower's and connector's LayerNorms, each tower layer's second residual add inside its norm, and its q/k/v
            as one GEMM).
    """

    model_type = "nanovision_text"
    base_config_key = "text_config"
    keys_to_ignore_at_inference = ["past_key_values"]
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    vocab_size: int = positive_int_field(default=50304)
    hidden_size: int = positive_int_field(default=768)
    intermediate_size: int | None = positive_int_field(default=None)
    num_hidden_layers: int = positive_int_field(default=12)
    num_attention_heads: int = positive_int_field(default=6)
    num_key_value_heads: int | None = positive_int_field(default=None)
    head_dim: int | None = positive_int_field(default=None)
    mlp_type: Literal["swiglu", "relu2"] = "swiglu"
    max_position_embeddings: int = positive_int_field(default=2048)
    rope_parameters: dict | None = None
    rms_norm_eps: int | float = interval(min=0.0, exclude_min=True)(default=1e-6)
    embedding_norm: bool = False
    norm_weights: bool = True
    qk_norm: Literal["none", "parameter_free", "learnable"] = "none"
    attention_bias: bool = False
    attention_dropout: int | float = interval(min=0.0, max=1.0, exclude_max=True)(default=0.0)
    final_logit_softcapping: int | float | None = positive_number_or_none(default=None)
    tie_word_embeddings: bool = False
    initializer_range: int | float = interval(min=0.0)(default=0.02)
    use_fused_kernels: bool | list[str] | tuple[str, ...] = fused_kernel_selection(default=False)
    use_cache: bool = True
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = 2

    def __post_init__(self, **kwargs):
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.hidden_size % self.num_attention_heads == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads  # otherwise validate_architecture says why
        self.base_model_tp_plan = self.tensor_parallel_plan()
        kwargs.setdefault("auto_map", dict(TEXT_AUTO_MAP))
        super().__post_init__(**kwargs)  # also fills rope_parameters' defaults (default type, default_theta)

    def tensor_parallel_plan(self):
        """transformers' tp_plan (used by `tp_plan="auto"` and vLLM's Transformers backend) for the modules this
        config builds: heads and MLP channels split across ranks. Learnable QK-norm weights act on each rank's own
        heads, so their gradients are partial sums: all-reduced."""
        plan = {f"layers.*.self_attn.{name}_proj": "colwise" for name in "qkv"}
        if self.qk_norm == "learnable":
            plan.update({f"layers.*.self_attn.{name}_norm": "replicated_with_grad_allreduce" for name in "qk"})
        plan["layers.*.self_attn.o_proj"] = "rowwise"
        if self.mlp_type == "swiglu":
            plan["layers.*.mlp.gate_proj"] = "colwise"
        plan.update({"layers.*.mlp.up_proj": "colwise", "layers.*.mlp.down_proj": "rowwise"})
        return plan

    def validate_architecture(self):
        """Part of `@strict`-powered validation: the head shapes."""
        for name in ("intermediate_size", "num_key_value_heads"):
            if getattr(self, name) is None:
                raise ValueError(f"NanoVisionTextConfig.{name} is None: set a positive integer.")
        if self.head_dim is None:
            raise ValueError(
                f"NanoVisionTextConfig.hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}), or set head_dim explicitly."
            )
        if self.head_dim % 2:
            raise ValueError(
                f"NanoVisionTextConfig.head_dim ({self.head_dim}) must be even: the rotary embedding rotates pairs."
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"NanoVisionTextConfig.num_key_value_heads ({self.num_key_value_heads}) must divide "
                f"num_attention_heads ({self.num_attention_heads}): each kv head serves a group of query heads."
            )

    def validate_rope(self):
        """Part of `@strict`-powered validation: a rope type the model can build, a usable theta, then transformers'
        own per-type key checks."""
        rope = self.rope_parameters
        if not isinstance(rope, dict):
            raise ValueError(f"NanoVisionTextConfig.rope_parameters must be a dict, got {rope!r}.")
        rope_types = ["default", *ROPE_INIT_FUNCTIONS]
        if rope.get("rope_type", rope.get("type")) not in rope_types:
            raise ValueError(
                f"NanoVisionTextConfig.rope_parameters['rope_type'] must be one of {rope_types}, "
                f"got {rope.get('rope_type')!r}."
            )
        theta = rope.get("rope_theta")
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not (math.isfinite(theta) and theta > 0):
            raise ValueError(
                f"NanoVisionTextConfig.rope_parameters['rope_theta'] must be a finite number > 0, got {theta!r}."
            )
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(
                "NanoVisionTextConfig.rope_parameters['partial_rotary_factor'] must be 1.0 (or absent): nanovision "
                f"rotates the whole head, got {rope['partial_rotary_factor']!r}."
            )
        try:
            super().validate_rope()
        except KeyError as err:  # transformers names the missing keys
            raise ValueError(f"NanoVisionTextConfig.rope_parameters: {err.args[0]}") from err

    @property
    def fused_kernel_ops(self):
        """The ops `use_fused_kernels` asks for, as a tuple of names."""
        return FUSED_KERNEL_OPS if self.use_fused_kernels is True else tuple(self.use_fused_kernels or ())


@strict
class NanoVisionConfig(PreTrainedConfig):
    r"""Configuration of the nanovision vision-language model: a SigLIP vision tower, a connector and a
    nanovision language model.

    Args:
        text_config: a `NanoVisionTextConfig` or its dict.
        vision_config: a transformers `SiglipVisionConfig` or its dict.
        connector_type: "pixel_shuffle" (space-to-depth by `pixel_shuffle_factor`, then an MLP) or
            "perceiver" (learned queries cross-attending to the patches, then an MLP).
        pixel_shuffle_factor: r; the image takes (image_size / patch_size)^2 / r^2 tokens.
        connector_position_embedding: pixel_shuffle only: add a learned embedding per image-token position to the
            connector's output (zero-initialised), so the language model reads where each token sits in the grid.
        perceiver_num_queries, perceiver_num_layers, perceiver_num_heads: the resampler's shape.
        image_token_id: id of the `<image>` placeholder token that image embeddings replace.
        vision_feature_layer: which hidden state of the vision tower feeds the connector (-1: the last).
        tie_word_embeddings: defaults to, and must equal, text_config.tie_word_embeddings (the language model
            builds its head for that choice).
    """

    model_type = "nanovision"
    sub_configs = {"text_config": NanoVisionTextConfig, "vision_config": SiglipVisionConfig}
    keys_to_ignore_at_inference = ["past_key_values"]

    # Sub-configs are recognised by model_type rather than class: Hub remote code loads its own copy of the classes.
    text_config: PreTrainedConfig | dict | None = None
    vision_config: PreTrainedConfig | dict | None = None
    connector_type: Literal["pixel_shuffle", "perceiver"] = "pixel_shuffle"
    pixel_shuffle_factor: int = positive_int_field(default=2)
    connector_position_embedding: bool = False
    perceiver_num_queries: int = positive_int_field(default=64)
    perceiver_num_layers: int = positive_int_field(default=2)
    perceiver_num_heads: int = positive_int_field(default=8)
    image_token_id: int = 6
    vision_feature_layer: int = -1
    tie_word_embeddings: bool | None = None

    def __post_init__(self, **kwargs):
        for key, config_class in self.sub_configs.items():
            value = getattr(self, key)
            if value is None or isinstance(value, dict):
                setattr(self, key, config_class(**(value or {})))
        if not hasattr(self.vision_config, "vision_use_head"):
            self.vision_config.vision_use_head = False  # the connector reads the patches; SigLIP's pooling head is unused
        if self.tie_word_embeddings is None:
            self.tie_word_embeddings = getattr(self.text_config, "tie_word_embeddings", False)
        kwargs.setdefault("auto_map", dict(VLM_AUTO_MAP))
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Part of `@strict`-powered validation: each sub-config is of its kind and valid (again, so that changes made
        to it after construction are caught on save)."""
        for key, config_class in self.sub_configs.items():
            sub_config = getattr(self, key)
            if getattr(sub_config, "model_type", None) != config_class.model_type:
                raise ValueError(
                    f"NanoVisionConfig.{key} must be a {config_class.__name__} (model_type "
                    f"{config_class.model_type!r}) or its dict, got {type(sub_config).__name__} with model_type "
                    f"{getattr(sub_config, 'model_type', None)!r}."
                )
            sub_config.validate()
        if self.tie_word_embeddings != self.text_config.tie_word_embeddings:
            raise ValueError(
                f"NanoVisionConfig.tie_word_embeddings ({self.tie_word_embeddings}) must equal "
                f"text_config.tie_word_embeddings ({self.text_config.tie_word_embeddings}): set it on text_config."
            )

    def validate_connector(self):
        """Part of `@strict`-powered validation: the vision tower's output fits the connector."""
        vision = self.vision_config
        for name in ("image_size", "patch_size"):
            if isinstance(getattr(vision, name), bool) or not isinstance(getattr(vision, name), int):
                raise ValueError(
                    f"NanoVisionConfig.vision_config.{name} must be one integer (square images), got "
                    f"{getattr(vision, name)!r}."
                )
        if vision.image_size % vision.patch_size:
            raise ValueError(
                f"NanoVisionConfig.vision_config.image_size ({vision.image_size}) must be a multiple of patch_size "
                f"({vision.patch_size}), or the tower drops the border pixels."
            )
        if vision.num_channels != 3:
            raise ValueError(
                f"NanoVisionConfig.vision_config.num_channels must be 3 (RGB images), got {vision.num_channels}."
            )
        if vision.hidden_size % vision.num_attention_heads:
            raise ValueError(
                f"NanoVisionConfig.vision_config.num_attention_heads ({vision.num_attention_heads}) must divide "
                f"vision_config.hidden_size ({vision.hidden_size})."
            )
        layers = vision.num_hidden_layers
        if not -(layers + 1) <= self.vision_feature_layer <= layers:
            raise ValueError(
                f"NanoVisionConfig.vision_feature_layer ({self.vision_feature_layer}) must index the tower's "
                f"{layers + 1} hidden states: between {-(layers + 1)} and {layers}."
            )
        patches_per_side = vision.image_size // vision.patch_size
        if self.connector_type == "pixel_shuffle" and patches_per_side % self.pixel_shuffle_factor:
            raise ValueError(
                f"NanoVisionConfig.pixel_shuffle_factor ({self.pixel_shuffle_factor}) must divide the number of "
                f"patches per side ({patches_per_side} = vision_config.image_size {vision.image_size} "
                f"// patch_size {vision.patch_size})."
            )
        if self.connector_position_embedding and self.connector_type != "pixel_shuffle":
            raise ValueError(
                "NanoVisionConfig.connector_position_embedding applies to connector_type='pixel_shuffle' only (the "
                "perceiver's learned queries already tell the tokens apart); set it to False."
            )
        if self.connector_type == "perceiver" and vision.hidden_size % self.perceiver_num_heads:
            raise ValueError(
                f"NanoVisionConfig.perceiver_num_heads ({self.perceiver_num_heads}) must divide "
                f"vision_config.hidden_size ({vision.hidden_size})."
            )

    def validate_image_tokens(self):
        """Part of `@strict`-powered validation: the image placeholder is a token and an image fits the context."""
        if not 0 <= self.image_token_id < self.text_config.vocab_size:
            raise ValueError(
                f"NanoVisionConfig.image_token_id ({self.image_token_id}) must be a token id below "
                f"text_config.vocab_size ({self.text_config.vocab_size})."
            )
        if self.num_image_tokens >= self.text_config.max_position_embeddings:
            raise ValueError(
                f"NanoVisionConfig: one image takes {self.num_image_tokens} tokens, which leaves no room for text in "
                f"text_config.max_position_embeddings ({self.text_config.max_position_embeddings}); raise "
                "pixel_shuffle_factor, lower perceiver_num_queries or use a longer context."
            )

    @property
    def num_image_tokens(self):
        """How many language-model positions one image fills."""
        if self.connector_type == "perceiver":
            return self.perceiver_num_queries
        patches_per_side = self.vision_config.image_size // self.vision_config.patch_size
        return (patches_per_side // self.pixel_shuffle_factor) ** 2


__all__ = ["NanoVisionTextConfig", "NanoVisionConfig"]

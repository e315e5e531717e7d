"""Configurations of nanovision: the nanochat-style text model and the composite vision-language model.

This file is shipped next to the model as Hub remote code, so it imports only from transformers.
"""

from transformers import PretrainedConfig, SiglipVisionConfig

MLP_TYPES = ("swiglu", "relu2")
QK_NORM_TYPES = ("none", "parameter_free", "learnable")
FUSED_KERNEL_OPS = ("rms_norm", "swiglu", "rope", "linear_cross_entropy")
CONNECTOR_TYPES = ("pixel_shuffle", "perceiver")

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


def _require_positive(config, *names):
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{type(config).__name__}.{name} must be a positive integer, got {value!r}.")


def _require_choice(config, name, choices):
    value = getattr(config, name)
    if value not in choices:
        raise ValueError(f"{type(config).__name__}.{name} must be one of {list(choices)}, got {value!r}.")


class NanoVisionTextConfig(PretrainedConfig):
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
        head_dim: width of one head (defaults to hidden_size // num_attention_heads).
        mlp_type: "swiglu" (down(silu(gate(x)) * up(x))) or "relu2" (down(relu(up(x))**2)).
        max_position_embeddings: longest sequence the rotary tables are sized for.
        rope_parameters: transformers' standard rotary dict, e.g. {"rope_type": "default", "rope_theta": 10000.0}.
        rms_norm_eps: epsilon of every RMSNorm.
        embedding_norm: apply an RMSNorm right after the token embedding (nanochat).
        norm_weights: RMSNorms have learnable weights (Llama) or none (nanochat).
        qk_norm: "none", "parameter_free" (nanochat) or "learnable" (per-head weights, Qwen3-style); applied
            to queries and keys before the rotary embedding.
        attention_bias: bias on the q/k/v projections (Qwen2-style); the output projection never has one.
        attention_dropout: dropout on attention probabilities.
        final_logit_softcapping: if set, logits = c * tanh(logits / c).
        tie_word_embeddings: share the token embedding and the output head.
        initializer_range: std of the normal init of embeddings and projections.
        use_fused_kernels: False, True (all ops) or a list of ops from FUSED_KERNEL_OPS to run with nanovision's
            fused kernels (nanovision.kernels.apply_fused_kernels): "rms_norm" (the norms), "swiglu" (the MLP's
            activation and down projection, swiglu or relu2), "rope" (the rotary embedding, q/k/v as one GEMM) and
            "linear_cross_entropy" (the head and the training loss without logits).
    """

    model_type = "nanovision_text"
    base_config_key = "text_config"
    keys_to_ignore_at_inference = ["past_key_values"]
    default_theta = 10000.0
    # Tensor parallel (transformers' tp_plan, vLLM's Transformers backend): heads and MLP channels split across ranks.
    # Learnable QK-norm weights act on each rank's own heads, so their gradients are partial sums: all-reduced.
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.q_norm": "replicated_with_grad_allreduce",
        "layers.*.self_attn.k_norm": "replicated_with_grad_allreduce",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    def __init__(
        self,
        vocab_size=50304,
        hidden_size=768,
        intermediate_size=None,
        num_hidden_layers=12,
        num_attention_heads=6,
        num_key_value_heads=None,
        head_dim=None,
        mlp_type="swiglu",
        max_position_embeddings=2048,
        rope_parameters=None,
        rms_norm_eps=1e-6,
        embedding_norm=False,
        norm_weights=True,
        qk_norm="none",
        attention_bias=False,
        attention_dropout=0.0,
        final_logit_softcapping=None,
        tie_word_embeddings=False,
        initializer_range=0.02,
        use_fused_kernels=False,
        use_cache=True,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = 4 * hidden_size if intermediate_size is None else intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.head_dim = head_dim
        self.mlp_type = mlp_type
        self.max_position_embeddings = max_position_embeddings
        self.rope_parameters = rope_parameters or {"rope_type": "default", "rope_theta": self.default_theta}
        self.rms_norm_eps = rms_norm_eps
        self.embedding_norm = embedding_norm
        self.norm_weights = norm_weights
        self.qk_norm = qk_norm
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.final_logit_softcapping = final_logit_softcapping
        self.tie_word_embeddings = tie_word_embeddings
        self.initializer_range = initializer_range
        self.use_fused_kernels = use_fused_kernels
        self.use_cache = use_cache
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self._validate_shapes()
        if self.head_dim is None:
            self.head_dim = hidden_size // num_attention_heads
        kwargs.setdefault("auto_map", dict(TEXT_AUTO_MAP))
        super().__init__(**kwargs)

    def _validate_shapes(self):
        _require_positive(
            self, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
        )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"NanoVisionTextConfig.hidden_size ({self.hidden_size}) must be divisible by "
                    f"num_attention_heads ({self.num_attention_heads}), or set head_dim explicitly."
                )
        else:
            _require_positive(self, "head_dim")
        if (self.head_dim or self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError("NanoVisionTextConfig.head_dim must be even for the rotary embedding.")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"NanoVisionTextConfig.num_key_value_heads ({self.num_key_value_heads}) must divide "
                f"num_attention_heads ({self.num_attention_heads})."
            )
        _require_choice(self, "mlp_type", MLP_TYPES)
        _require_choice(self, "qk_norm", QK_NORM_TYPES)
        if not self.rms_norm_eps > 0:
            raise ValueError(f"NanoVisionTextConfig.rms_norm_eps must be > 0, got {self.rms_norm_eps!r}.")
        if not 0.0 <= self.attention_dropout < 1.0:
            raise ValueError(
                f"NanoVisionTextConfig.attention_dropout must be in [0, 1), got {self.attention_dropout!r}."
            )
        if self.final_logit_softcapping is not None and not self.final_logit_softcapping > 0:
            raise ValueError(
                "NanoVisionTextConfig.final_logit_softcapping must be a positive number or None, "
                f"got {self.final_logit_softcapping!r}."
            )
        self.fused_kernel_ops  # validates use_fused_kernels

    @property
    def fused_kernel_ops(self):
        """The ops `use_fused_kernels` asks for, as a tuple of names."""
        if self.use_fused_kernels is True:
            return FUSED_KERNEL_OPS
        if not self.use_fused_kernels:
            return ()
        if isinstance(self.use_fused_kernels, str) or not all(op in FUSED_KERNEL_OPS for op in self.use_fused_kernels):
            raise ValueError(
                f"NanoVisionTextConfig.use_fused_kernels must be a bool or a list of ops from {list(FUSED_KERNEL_OPS)}, "
                f"got {self.use_fused_kernels!r}."
            )
        return tuple(self.use_fused_kernels)


class NanoVisionConfig(PretrainedConfig):
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
    """

    model_type = "nanovision"
    sub_configs = {"text_config": NanoVisionTextConfig, "vision_config": SiglipVisionConfig}
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        text_config=None,
        vision_config=None,
        connector_type="pixel_shuffle",
        pixel_shuffle_factor=2,
        connector_position_embedding=False,
        perceiver_num_queries=64,
        perceiver_num_layers=2,
        perceiver_num_heads=8,
        image_token_id=6,
        vision_feature_layer=-1,
        tie_word_embeddings=None,
        **kwargs,
    ):
        if text_config is None:
            text_config = NanoVisionTextConfig()
        elif isinstance(text_config, dict):
            text_config = NanoVisionTextConfig(**text_config)
        if vision_config is None:
            vision_config = SiglipVisionConfig()
        elif isinstance(vision_config, dict):
            vision_config = SiglipVisionConfig(**vision_config)
        if not hasattr(vision_config, "vision_use_head"):
            vision_config.vision_use_head = False  # the connector reads the patches; SigLIP's pooling head is unused
        self.text_config = text_config
        self.vision_config = vision_config
        self.connector_type = connector_type
        self.pixel_shuffle_factor = pixel_shuffle_factor
        self.connector_position_embedding = connector_position_embedding
        self.perceiver_num_queries = perceiver_num_queries
        self.perceiver_num_layers = perceiver_num_layers
        self.perceiver_num_heads = perceiver_num_heads
        self.image_token_id = image_token_id
        self.vision_feature_layer = vision_feature_layer
        self.tie_word_embeddings = text_config.tie_word_embeddings if tie_word_embeddings is None else tie_word_embeddings
        self._validate_connector()
        kwargs.setdefault("auto_map", dict(VLM_AUTO_MAP))
        super().__init__(**kwargs)

    def _validate_connector(self):
        _require_choice(self, "connector_type", CONNECTOR_TYPES)
        _require_positive(self, "pixel_shuffle_factor", "perceiver_num_queries", "perceiver_num_layers",
                          "perceiver_num_heads")
        patches_per_side = self.vision_config.image_size // self.vision_config.patch_size
        if self.connector_type == "pixel_shuffle" and patches_per_side % self.pixel_shuffle_factor:
            raise ValueError(
                f"NanoVisionConfig.pixel_shuffle_factor ({self.pixel_shuffle_factor}) must divide the number of "
                f"patches per side ({patches_per_side} = vision_config.image_size {self.vision_config.image_size} "
                f"// patch_size {self.vision_config.patch_size})."
            )
        if self.connector_position_embedding and self.connector_type != "pixel_shuffle":
            raise ValueError(
                "NanoVisionConfig.connector_position_embedding applies to connector_type='pixel_shuffle' only (the "
                "perceiver's learned queries already tell the tokens apart); set it to False."
            )
        if self.connector_type == "perceiver" and self.vision_config.hidden_size % self.perceiver_num_heads:
            raise ValueError(
                f"NanoVisionConfig.perceiver_num_heads ({self.perceiver_num_heads}) must divide "
                f"vision_config.hidden_size ({self.vision_config.hidden_size})."
            )
        if not 0 <= self.image_token_id < self.text_config.vocab_size:
            raise ValueError(
                f"NanoVisionConfig.image_token_id ({self.image_token_id}) must be a token id below "
                f"text_config.vocab_size ({self.text_config.vocab_size})."
            )

    @property
    def num_image_tokens(self):
        """How many language-model positions one image fills."""
        if self.connector_type == "perceiver":
            return self.perceiver_num_queries
        patches_per_side = self.vision_config.image_size // self.vision_config.patch_size
        return (patches_per_side // self.pixel_shuffle_factor) ** 2


__all__ = ["NanoVisionTextConfig", "NanoVisionConfig"]

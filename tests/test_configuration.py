import json
import re

import pytest
from conftest import TINY_VISION, tiny_text_config, tiny_vlm_config
from huggingface_hub.errors import StrictDataclassError
from test_modeling import BLOCKS
from transformers import AutoConfig, SiglipVisionConfig

import nanovision
from nanovision import NanoVisionConfig, NanoVisionForCausalLM, NanoVisionForConditionalGeneration, NanoVisionTextConfig
from nanovision.configuration_nanovision import FUSED_KERNEL_OPS

# config.json files written by nanovision before its configs became typed dataclasses (transformers 5.19): they must
# keep loading to the same config.
OLD_TEXT_CONFIG = {
    "architectures": ["NanoVisionForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_nanovision.NanoVisionTextConfig",
                 "AutoModel": "modeling_nanovision.NanoVisionTextModel",
                 "AutoModelForCausalLM": "modeling_nanovision.NanoVisionForCausalLM"},
    "bos_token_id": 0, "dtype": "float32", "embedding_norm": False, "eos_token_id": 1,
    "final_logit_softcapping": 15.0, "head_dim": 16, "hidden_size": 64, "initializer_range": 0.02,
    "intermediate_size": 96, "max_position_embeddings": 128, "mlp_type": "swiglu", "model_type": "nanovision_text",
    "norm_weights": True, "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2,
    "pad_token_id": 2, "qk_norm": "none", "rms_norm_eps": 1e-06,
    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "tie_word_embeddings": True,
    "transformers_version": "5.19.0", "use_cache": True, "use_fused_kernels": False, "vocab_size": 96,
}
OLD_VLM_CONFIG = {
    "architectures": ["NanoVisionForConditionalGeneration"],
    "auto_map": {"AutoConfig": "configuration_nanovision.NanoVisionConfig",
                 "AutoModel": "modeling_nanovision.NanoVisionModel",
                 "AutoModelForImageTextToText": "modeling_nanovision.NanoVisionForConditionalGeneration"},
    "connector_position_embedding": False, "connector_type": "perceiver", "dtype": "float32", "image_token_id": 6,
    "model_type": "nanovision", "perceiver_num_heads": 2, "perceiver_num_layers": 2, "perceiver_num_queries": 4,
    "pixel_shuffle_factor": 2,
    "text_config": {**{k: v for k, v in OLD_TEXT_CONFIG.items() if k not in ("architectures", "dtype",
                                                                             "transformers_version")},
                    "final_logit_softcapping": None, "mlp_type": "relu2", "qk_norm": "learnable",
                    "tie_word_embeddings": False, "use_fused_kernels": ["rope"]},
    "tie_word_embeddings": False, "transformers_version": "5.19.0",
    "vision_config": {"attention_dropout": 0.0, "hidden_act": "gelu_pytorch_tanh", "hidden_size": 32,
                      "image_size": 32, "intermediate_size": 64, "layer_norm_eps": 1e-06,
                      "model_type": "siglip_vision_model", "num_attention_heads": 2, "num_channels": 3,
                      "num_hidden_layers": 1, "patch_size": 8, "vision_use_head": False},
    "vision_feature_layer": -1,
}


def saved_json(config, path):
    config.save_pretrained(path)
    return json.loads((path / "config.json").read_text())


def without_version(saved):
    return {key: value for key, value in saved.items() if key != "transformers_version"}


# ---------------------------------------------------------------- validation at construction

TEXT_INVALID = [
    # wrong type
    (dict(vocab_size="96"), "vocab_size"),
    (dict(hidden_size=64.0), "hidden_size"),
    (dict(intermediate_size=2.5), "intermediate_size"),
    (dict(num_hidden_layers=True), "num_hidden_layers"),
    (dict(mlp_type="gelu"), "mlp_type"),
    (dict(qk_norm="l2"), "qk_norm"),
    (dict(norm_weights="yes"), "norm_weights"),
    (dict(final_logit_softcapping="15"), "final_logit_softcapping"),
    (dict(rope_parameters="default"), "rope_parameters"),
    (dict(use_fused_kernels="rope"), "use_fused_kernels"),
    (dict(eos_token_id="1"), "eos_token_id"),
    # out of range
    (dict(vocab_size=0), "vocab_size"),
    (dict(num_hidden_layers=-1), "num_hidden_layers"),
    (dict(num_attention_heads=0), "num_attention_heads"),
    (dict(max_position_embeddings=0), "max_position_embeddings"),
    (dict(rms_norm_eps=0.0), "rms_norm_eps"),
    (dict(attention_dropout=1.0), "attention_dropout"),
    (dict(attention_dropout=-0.1), "attention_dropout"),
    (dict(final_logit_softcapping=0.0), "final_logit_softcapping"),
    (dict(initializer_range=-0.02), "initializer_range"),
    (dict(use_fused_kernels=["rmsnorm"]), "use_fused_kernels"),
    # across fields
    (dict(hidden_size=65), "hidden_size"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(head_dim=15), "head_dim"),
    # rotary
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 0.0}), "rope_theta"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": -10000.0}), "rope_theta"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": float("inf")}), "rope_theta"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": "1e4"}), "rope_theta"),
    (dict(rope_parameters={"rope_type": "ntk", "rope_theta": 10000.0}), "rope_type"),
    (dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0}), "factor"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
     "partial_rotary_factor"),
]


@pytest.mark.parametrize("overrides, field", TEXT_INVALID, ids=[str(case[0]) for case in TEXT_INVALID])
def test_invalid_text_config_names_the_field(overrides, field):
    with pytest.raises(StrictDataclassError, match=field):
        tiny_text_config(**overrides)


VLM_INVALID = [
    (dict(text_config="tiny"), "text_config"),
    (dict(vision_config=["siglip"]), "vision_config"),
    (dict(text_config=SiglipVisionConfig(**TINY_VISION)), "text_config must be a NanoVisionTextConfig"),
    (dict(vision_config={**TINY_VISION, "model_type": "siglip"}), "vision_config must be a SiglipVisionConfig"),
    (dict(connector_type="qformer"), "connector_type"),
    (dict(pixel_shuffle_factor=0), "pixel_shuffle_factor"),
    (dict(pixel_shuffle_factor=3), "pixel_shuffle_factor"),
    (dict(connector_type="perceiver", perceiver_num_heads=5), "perceiver_num_heads"),
    (dict(connector_type="perceiver", perceiver_num_queries=0), "perceiver_num_queries"),
    (dict(connector_type="perceiver", perceiver_num_queries=128), "max_position_embeddings"),
    (dict(connector_type="perceiver", connector_position_embedding=True), "connector_position_embedding"),
    (dict(image_token_id=500), "image_token_id"),
    (dict(image_token_id=-1), "image_token_id"),
    (dict(image_token_id=6.0), "image_token_id"),
    (dict(vision_feature_layer=2), "vision_feature_layer"),
    (dict(vision_feature_layer=-3), "vision_feature_layer"),
    (dict(tie_word_embeddings=True), "tie_word_embeddings"),
    (dict(vision_config={**TINY_VISION, "image_size": 30}), "image_size"),
    (dict(vision_config={**TINY_VISION, "image_size": [32, 32]}), "image_size"),
    (dict(vision_config={**TINY_VISION, "num_channels": 1}), "num_channels"),
    (dict(vision_config={**TINY_VISION, "num_attention_heads": 3}), "num_attention_heads"),
    (dict(text_config={"hidden_size": 0}), "hidden_size"),
]


@pytest.mark.parametrize("overrides, field", VLM_INVALID, ids=[str(case[0]) for case in VLM_INVALID])
def test_invalid_vlm_config_names_the_field(overrides, field):
    with pytest.raises(StrictDataclassError, match=field):
        tiny_vlm_config(**overrides)


def test_defaults_derived_fields_and_token_count():
    config = NanoVisionTextConfig(hidden_size=128, num_attention_heads=4)
    assert (config.intermediate_size, config.num_key_value_heads, config.head_dim) == (512, 4, 32)
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}
    assert tiny_text_config(hidden_size=96, num_attention_heads=4, head_dim=16).head_dim == 16  # q width != hidden
    assert tiny_text_config().fused_kernel_ops == ()
    assert tiny_text_config(use_fused_kernels=True).fused_kernel_ops == FUSED_KERNEL_OPS
    assert tiny_text_config(use_fused_kernels=list(FUSED_KERNEL_OPS[:1])).fused_kernel_ops == FUSED_KERNEL_OPS[:1]
    assert tiny_vlm_config().num_image_tokens == 4  # 32px / 8px patches = 4x4, pixel shuffle 2 -> 2x2
    assert tiny_vlm_config(connector_type="perceiver").num_image_tokens == 4
    assert tiny_vlm_config(pixel_shuffle_factor=1).num_image_tokens == 16
    vlm = tiny_vlm_config(text=tiny_text_config(tie_word_embeddings=True))
    assert vlm.tie_word_embeddings is True
    assert isinstance(vlm.vision_config, SiglipVisionConfig) and vlm.vision_config.vision_use_head is False


# ---------------------------------------------------------------- validation on assignment and on save


def test_wrong_type_or_range_is_refused_on_assignment():
    config = tiny_text_config()
    with pytest.raises(StrictDataclassError, match="final_logit_softcapping"):
        config.final_logit_softcapping = "15"
    with pytest.raises(StrictDataclassError, match="vocab_size"):
        config.vocab_size = 0
    with pytest.raises(StrictDataclassError, match="use_fused_kernels"):
        config.use_fused_kernels = ["rmsnorm"]
    assert config.final_logit_softcapping is None and config.vocab_size == 96


def _kv_heads(config):
    config.num_key_value_heads = 3


def _rope_theta_in_place(config):
    config.rope_parameters["rope_theta"] = -1.0


def _rope_type(config):
    config.rope_parameters = {"rope_type": "ntk", "rope_theta": 1e4}


def _text_head_dim(config):
    config.text_config.head_dim = 15


def _vision_image_size(config):
    config.vision_config.image_size = 30


def _image_token(config):
    config.image_token_id = 500


def _shuffle_factor(config):
    config.pixel_shuffle_factor = 3


@pytest.mark.parametrize(
    "make, mutate, field",
    [
        (tiny_text_config, _kv_heads, "num_key_value_heads"),
        (tiny_text_config, _rope_theta_in_place, "rope_theta"),
        (tiny_text_config, _rope_type, "rope_type"),
        (tiny_vlm_config, _text_head_dim, "head_dim"),
        (tiny_vlm_config, _vision_image_size, "image_size"),
        (tiny_vlm_config, _image_token, "image_token_id"),
        (tiny_vlm_config, _shuffle_factor, "pixel_shuffle_factor"),
    ],
)
def test_save_refuses_a_config_mutated_into_an_invalid_one(tmp_path, make, mutate, field):
    config = make()
    mutate(config)  # each change passes its field's own check; only the config as a whole is wrong
    with pytest.raises(StrictDataclassError, match=field):
        config.save_pretrained(tmp_path)
    assert not (tmp_path / "config.json").exists()


# ---------------------------------------------------------------- serialisation


@pytest.mark.parametrize("block", list(BLOCKS))
def test_text_config_round_trip_and_auto_config(tmp_path, block):
    config = tiny_text_config(**BLOCKS[block], use_fused_kernels=["rope"])
    saved = saved_json(config, tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, NanoVisionTextConfig)
    assert loaded.to_diff_dict() == config.to_diff_dict()
    assert saved["auto_map"]["AutoConfig"] == "configuration_nanovision.NanoVisionTextConfig"
    assert saved["model_type"] == "nanovision_text"


@pytest.mark.parametrize("connector", ["pixel_shuffle", "perceiver"])
def test_vlm_config_round_trip_and_auto_config(tmp_path, connector):
    config = tiny_vlm_config(connector_type=connector, vision_feature_layer=-2)
    saved = saved_json(config, tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, NanoVisionConfig) and isinstance(loaded.text_config, NanoVisionTextConfig)
    assert loaded.to_diff_dict() == config.to_diff_dict()
    assert saved["model_type"] == "nanovision" and saved["text_config"]["model_type"] == "nanovision_text"
    assert saved["auto_map"]["AutoModelForImageTextToText"].endswith("NanoVisionForConditionalGeneration")


@pytest.mark.parametrize("old", [OLD_TEXT_CONFIG, OLD_VLM_CONFIG], ids=["text", "vlm"])
def test_config_json_of_the_old_code_loads_unchanged(tmp_path, old):
    (tmp_path / "config.json").write_text(json.dumps(old))
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert without_version(saved_json(loaded, tmp_path / "again")) == without_version(old)
    text = loaded.get_text_config()
    assert text.head_dim == 16 and text.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}


def test_presets_follow_nanochat_depth_scaling():
    d20 = nanovision.presets.text_config(depth=20)
    assert (d20.hidden_size, d20.num_hidden_layers, d20.num_attention_heads, d20.num_key_value_heads) == (1280, 20, 10, 5)
    assert (d20.head_dim, d20.intermediate_size, d20.mlp_type, d20.tie_word_embeddings) == (128, 3456, "swiglu", False)
    original = nanovision.presets.nanochat_config(depth=12)
    assert (original.hidden_size, original.num_key_value_heads, original.num_attention_heads) == (768, 6, 6)
    assert (original.mlp_type, original.qk_norm, original.final_logit_softcapping) == ("relu2", "parameter_free", 15.0)
    assert original.norm_weights is False and original.embedding_norm is True
    odd = nanovision.presets.text_config(depth=6, head_dim=64)  # 6 heads -> 3 kv heads
    assert odd.num_attention_heads % odd.num_key_value_heads == 0


# ---------------------------------------------------------------- tensor-parallel plan


def assert_plan_matches_modules(model):
    modules = dict(model.named_modules())
    for pattern in model.tp_plan:
        regex = re.compile(re.escape(pattern).replace(r"\*", r"\d+"))
        assert any(regex.fullmatch(name) for name in modules), f"tp_plan entry {pattern} matches no module"
    # and the plan leaves out nothing of the language model that must be split or all-reduced: every projection,
    # every learnable q/k norm
    for name, module in modules.items():
        generic = re.sub(r"\.\d+\.", ".*.", name)
        learnable_norm = name.endswith(("q_norm", "k_norm")) and module.weight is not None
        if re.match(r"model\.(language_model\.)?layers\.", name) and (name.endswith("_proj") or learnable_norm):
            assert generic in model.tp_plan, f"{name} is built but missing from the tp_plan"


@pytest.mark.parametrize("block", list(BLOCKS))
def test_tensor_parallel_plan_names_the_modules_each_config_builds(block):
    config = tiny_text_config(**BLOCKS[block], num_hidden_layers=1)
    assert_plan_matches_modules(NanoVisionForCausalLM(config))
    assert ("layers.*.mlp.gate_proj" in config.base_model_tp_plan) == (config.mlp_type == "swiglu")
    assert ("layers.*.self_attn.q_norm" in config.base_model_tp_plan) == (config.qk_norm == "learnable")


@pytest.mark.parametrize("block", ["nanochat", "qwen"])
def test_tensor_parallel_plan_of_the_vlm(block):
    model = NanoVisionForConditionalGeneration(tiny_vlm_config(tiny_text_config(**BLOCKS[block], num_hidden_layers=1)))
    assert any(key.startswith("model.language_model.layers.") for key in model.tp_plan)
    assert_plan_matches_modules(model)

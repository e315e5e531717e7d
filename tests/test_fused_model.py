"""The fused kernels inside the model: same outputs and gradients as the eager model."""

import logging

import pytest
import torch
from conftest import randomize, tiny_text_config, tiny_vlm_config
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer

pytest.importorskip("triton")
from nanovision.kernels import apply_fused_kernels, kernel_backends  # noqa: E402
from nanovision.kernels.layers import FusedSiglipAttention, FusedSiglipEncoderLayer  # noqa: E402

BLOCKS = {
    "llama": dict(),
    "nanochat": dict(mlp_type="relu2", norm_weights=False, embedding_norm=True, qk_norm="parameter_free",
                     final_logit_softcapping=15.0),
    "qwen": dict(qk_norm="learnable", attention_bias=True, tie_word_embeddings=True),
}


def pair(block):
    """The same weights twice: eager, and with every fused op from the config."""
    torch.manual_seed(0)
    eager = randomize(AutoModelForCausalLM.from_config(tiny_text_config(**BLOCKS[block]), attn_implementation="sdpa"))
    fused = AutoModelForCausalLM.from_config(tiny_text_config(use_fused_kernels=True, **BLOCKS[block]),
                                             attn_implementation="sdpa")
    fused.load_state_dict(eager.state_dict())
    return eager, fused


def test_backends_are_triton_and_logged(caplog):
    with caplog.at_level(logging.INFO, logger="nanovision"):
        _, fused = pair("llama")
    assert set(kernel_backends().values()) == {"triton"}
    assert fused.fused_kernel_ops == ("rms_norm", "swiglu", "rope", "linear_cross_entropy")
    assert type(fused.model.norm).__name__ == "FusedRMSNorm"
    assert type(fused.model.layers[0].mlp).__name__ == "FusedMLP"
    assert fused.linear_cross_entropy is not None


@pytest.mark.parametrize("block", list(BLOCKS))
def test_fused_model_matches_eager_loss_and_grads(block):
    eager, fused = pair(block)
    eager.train(), fused.train()
    ids = torch.randint(0, 96, (2, 13), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :3] = -100
    expected = eager(ids, labels=labels)
    actual = fused(ids, labels=labels)
    assert actual.logits is None  # fused linear cross-entropy never builds the logits
    torch.testing.assert_close(actual.loss, expected.loss, atol=1e-5, rtol=1e-5)
    expected.loss.backward()
    actual.loss.backward()
    eager_grads = dict(eager.named_parameters())
    for name, param in fused.named_parameters():
        torch.testing.assert_close(param.grad, eager_grads[name].grad, atol=1e-4, rtol=1e-3, msg=name)
    fused.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(ids).logits, eager.eval()(ids).logits, atol=1e-5, rtol=1e-5)


def test_apply_fused_kernels_to_an_existing_model_keeps_weights(tmp_path):
    eager, _ = pair("nanochat")
    keys = list(eager.state_dict())
    with pytest.raises(ValueError, match="rmsnorm"):
        apply_fused_kernels(eager, ops=["rmsnorm"])
    patched = apply_fused_kernels(eager, ops=["rms_norm", "rope"])
    assert list(patched.state_dict()) == keys and patched.linear_cross_entropy is None
    patched.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, 96, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, patched(ids).logits, atol=1e-5, rtol=1e-5)


def vlm_pair():
    torch.manual_seed(0)
    eager = randomize(AutoModelForImageTextToText.from_config(tiny_vlm_config()), std=0.1).train()
    fused = AutoModelForImageTextToText.from_config(tiny_vlm_config(text=tiny_text_config(use_fused_kernels=True)))
    fused.load_state_dict(eager.state_dict())
    return eager, fused.train()


def encoder_layers(tower):
    return [m for m in tower.modules() if isinstance(m, SiglipEncoderLayer)]


VLM_IDS = torch.tensor([[0, 7, 6, 6, 6, 6, 8, 20, 21, 22, 23]])


def vlm_pixels():
    return torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def test_fused_vlm_matches_eager():
    """Every op, the vision tower's LayerNorms, its layers' fused residual adds and q/k/v GEMMs included: the loss
    and every parameter's gradient."""
    eager, fused = vlm_pair()
    assert fused.fused_kernel_ops == ("rms_norm", "swiglu", "rope", "linear_cross_entropy", "layer_norm")
    tower_layers = encoder_layers(fused.model.vision_tower)
    assert tower_layers and all(isinstance(layer, FusedSiglipEncoderLayer) for layer in tower_layers)
    assert all(type(layer.self_attn) is FusedSiglipAttention for layer in tower_layers)
    assert tower_layers[0].layer_norm1.autocast_output and tower_layers[0].layer_norm2.autocast_output
    assert "LayerNorm" not in {type(m).__name__ for m in fused.modules()}
    expected = eager(VLM_IDS, pixel_values=vlm_pixels(), labels=VLM_IDS)
    actual = fused(VLM_IDS, pixel_values=vlm_pixels(), labels=VLM_IDS)
    torch.testing.assert_close(actual.loss, expected.loss, atol=1e-5, rtol=1e-5)
    expected.loss.backward()
    actual.loss.backward()
    eager_params = dict(eager.named_parameters())
    for name, p in fused.named_parameters():
        torch.testing.assert_close(p.grad, eager_params[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_fused_vision_tower_records_hidden_states_and_autocasts_like_torch():
    """The fused tower layers and attentions still count as SiglipEncoderLayer and SiglipAttention for transformers'
    output recording; under bf16 autocast the stream stays fp32, the norms feeding projections write bf16, and the
    loss matches the eager model's."""
    eager, fused = vlm_pair()
    tower, eager_tower = fused.model.vision_tower, eager.model.vision_tower
    tower.set_attn_implementation("eager"), eager_tower.set_attn_implementation("eager")
    with torch.no_grad():
        got = tower(vlm_pixels(), output_hidden_states=True, output_attentions=True)
        want = eager_tower(vlm_pixels(), output_hidden_states=True, output_attentions=True)
    assert len(got.hidden_states) == len(want.hidden_states) == len(encoder_layers(tower)) + 1
    assert len(got.attentions) == len(want.attentions) == len(encoder_layers(tower))
    for a, b in zip(got.hidden_states + got.attentions, want.hidden_states + want.attentions):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    dtypes = []
    layer = encoder_layers(tower)[0]
    layer.layer_norm1.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    layer.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = eager(VLM_IDS, pixel_values=vlm_pixels(), labels=VLM_IDS).loss
        actual = fused(VLM_IDS, pixel_values=vlm_pixels(), labels=VLM_IDS).loss
    assert dtypes == [torch.bfloat16, torch.float32]
    torch.testing.assert_close(actual, expected, atol=2e-2, rtol=2e-2)


def test_torch_compile_still_works_with_fused_kernels():
    eager, fused = pair("llama")
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(fused.eval())(ids).logits, eager.eval()(ids).logits,
                                   atol=1e-4, rtol=1e-4)


def test_fused_model_under_bf16_autocast_matches_eager():
    eager, fused = pair("llama")
    eager.train(), fused.train()
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(4))
    layer = fused.model.layers[0]
    assert layer.input_layernorm.autocast_output and layer.post_attention_layernorm.autocast_output
    assert not fused.model.norm.autocast_output  # feeds the head, kept in the residual's precision
    outputs = []
    layer.input_layernorm.register_forward_hook(lambda module, args, out: outputs.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, actual = eager(ids, labels=ids).loss, fused(ids, labels=ids).loss
    assert outputs == [torch.bfloat16]  # the projections share one bf16 copy instead of casting three
    actual.backward()
    assert actual.dtype == torch.float32 and fused.lm_head.weight.grad.dtype == torch.float32
    torch.testing.assert_close(actual, expected, atol=2e-2, rtol=2e-2)

"""The VLM in transformers' generation machinery, checked the way transformers checks its in-tree VLMs: assisted and
prompt-lookup decoding, inputs_embeds in place of input_ids, full-graph torch.compile and torch.export of decoding
with a static cache. Tiny models with random weights (nanochat's init zeroes the output layers, which would make
equal outputs prove nothing)."""

import pytest
import torch
from conftest import randomize, tiny_text_config, tiny_vlm_config
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, StaticCache

IMAGE = 6  # the <image> placeholder id of tiny_vlm_config
PER_IMAGE = 4
GREEDY = dict(do_sample=False, pad_token_id=2, eos_token_id=None)


def build_vlm(seed=0, **text_overrides):
    torch.manual_seed(seed)
    config = tiny_vlm_config(tiny_text_config(**text_overrides))
    return randomize(AutoModelForImageTextToText.from_config(config, attn_implementation="sdpa"), seed=seed).eval()


def image_prompt(seed=0):
    """One row: text, an image block, text; and the image's pixels."""
    gen = torch.Generator().manual_seed(seed)
    text = torch.randint(10, 96, (8,), generator=gen)
    ids = torch.cat([torch.tensor([0]), text[:3], torch.full((PER_IMAGE,), IMAGE), text[3:]])[None]
    return ids, torch.randn(1, 3, 32, 32, generator=gen)


@pytest.mark.parametrize("assistant", ["same model", "smaller VLM"])
def test_assisted_decoding_equals_greedy(assistant):
    """transformers runs the assistant without pixel_values (its prefill is no first iteration): the placeholders
    reach it against a cache, and the target's verification keeps the output greedy."""
    model = build_vlm()
    helper = model if assistant == "same model" else build_vlm(seed=1, num_hidden_layers=1, hidden_size=32,
                                                               intermediate_size=48)
    ids, pixels = image_prompt()
    greedy = model.generate(ids, pixel_values=pixels, max_new_tokens=10, **GREEDY)
    assisted = model.generate(ids, pixel_values=pixels, max_new_tokens=10, assistant_model=helper, **GREEDY)
    assert torch.equal(assisted, greedy)


def test_prompt_lookup_equals_greedy():
    model = build_vlm()
    ids, pixels = image_prompt(seed=2)
    ids = torch.cat([ids, ids[:, 1:4], ids[:, 1:4]], dim=1)  # repeats for the lookup to find
    greedy = model.generate(ids, pixel_values=pixels, max_new_tokens=10, **GREEDY)
    lookup = model.generate(ids, pixel_values=pixels, max_new_tokens=10, prompt_lookup_num_tokens=3, **GREEDY)
    assert torch.equal(lookup, greedy)


def test_generate_refuses_a_prompt_without_its_images():
    model = build_vlm()
    ids, _ = image_prompt()
    with pytest.raises(ValueError, match="Got 0 images but 1 <image> placeholders"):
        model.generate(ids, max_new_tokens=2, **GREEDY)


@pytest.mark.parametrize("kind", ["vlm", "text"])
def test_inputs_embeds_forward_equals_input_ids(kind):
    ids, pixels = image_prompt(seed=3)
    if kind == "vlm":
        model, images = build_vlm(), {"pixel_values": pixels}
    else:
        torch.manual_seed(0)
        model, images = randomize(AutoModelForCausalLM.from_config(tiny_text_config())).eval(), {}
    embeds = model.get_input_embeddings()(ids)
    with torch.no_grad():
        expected = model(input_ids=ids, **images).logits
        actual = model(inputs_embeds=embeds, **images).logits
    torch.testing.assert_close(actual, expected)
    if kind == "vlm":  # the images did reach the placeholders found in the embeddings
        with torch.no_grad():
            other = model(inputs_embeds=embeds, pixel_values=pixels + 0.5).logits
        assert not torch.allclose(other, expected)


@pytest.mark.parametrize("mode", [dict(), dict(num_beams=2), dict(cache_implementation="static")],
                         ids=["greedy", "beam_search", "static_cache"])
def test_generate_from_inputs_embeds_equals_input_ids(mode):
    model = build_vlm()
    ids, pixels = image_prompt(seed=4)
    expected = model.generate(ids, pixel_values=pixels, max_new_tokens=6, **GREEDY, **mode)[:, ids.shape[1]:]
    embeds = model.get_input_embeddings()(ids)
    actual = model.generate(inputs_embeds=embeds, pixel_values=pixels, max_new_tokens=6, **GREEDY, **mode)
    assert torch.equal(actual, expected)


def decode(step, model, ids, pixels, new_tokens):
    """Prefill with the image (eager), then greedy single-token steps through `step`, against a static cache."""
    cache = StaticCache(config=model.config, max_cache_len=32)
    with torch.no_grad():
        logits = model(ids, pixel_values=pixels, past_key_values=cache).logits[:, -1]
        steps = []
        for position in range(ids.shape[1], ids.shape[1] + new_tokens):
            token = logits.argmax(-1, keepdim=True)
            logits = step(input_ids=token, position_ids=torch.tensor([[position]]), past_key_values=cache).logits[:, -1]
            steps.append(logits)
    return torch.stack(steps)


def test_compiled_decoding_equals_eager():
    """The decoding forward compiles as one graph (no data-dependent branch on the cache length)."""
    model = build_vlm()
    ids, pixels = image_prompt(seed=5)
    expected = decode(model, model, ids, pixels, new_tokens=3)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    actual = decode(compiled, model, ids, pixels, new_tokens=3)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def test_torch_export_with_static_cache():
    """transformers' exportable wrapper (a static cache, one token per call) exports the VLM; the exported program,
    fed a sequence token by token, gives the eager logits of the whole sequence."""
    from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

    model = build_vlm()
    model.generation_config.cache_implementation = "static"
    exportable = TorchExportableModuleWithStaticCache(model, batch_size=1, max_cache_len=16)
    program = torch.export.export(exportable, args=(), kwargs={"input_ids": torch.tensor([[3]]),
                                                               "cache_position": torch.tensor([0])}, strict=False)
    sequence = torch.randint(10, 96, (1, 9), generator=torch.Generator().manual_seed(6))
    decoder = program.module()
    with torch.no_grad():
        stepped = torch.cat([decoder(input_ids=sequence[:, [t]], cache_position=torch.tensor([t]))
                             for t in range(sequence.shape[1])], dim=1)
        expected = model(sequence).logits
    torch.testing.assert_close(stepped, expected, atol=1e-5, rtol=1e-4)

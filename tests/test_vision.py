import json

import pytest
import torch
from conftest import TINY_VISION, randomize, run_without_nanovision, tiny_text_config, tiny_vlm_config
import safetensors.torch
from transformers import AutoModel, AutoModelForImageTextToText, SiglipVisionConfig, SiglipVisionModel

from nanovision import NanoVisionForCausalLM, NanoVisionForConditionalGeneration, NanoVisionModel

IMAGE = 6  # <image> placeholder id
PER_IMAGE = 4  # 32px images, 8px patches -> 16 patches -> pixel shuffle r=2 -> 4 tokens (perceiver: 4 queries)


def build(connector="pixel_shuffle", attn="sdpa", seed=0):
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(tiny_vlm_config(connector_type=connector), attn_implementation=attn)
    return randomize(model, seed=seed).eval()


def sample(texts_before_images, seed=0):
    """A row of random text tokens with PER_IMAGE placeholder tokens after each given text length."""
    gen = torch.Generator().manual_seed(seed)
    row = [0]
    for length in texts_before_images:
        row += torch.randint(10, 96, (length,), generator=gen).tolist() + [IMAGE] * PER_IMAGE
    return row + torch.randint(10, 96, (3,), generator=gen).tolist()


def pixels(n, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("connector", ["pixel_shuffle", "perceiver"])
def test_forward_backward_with_0_1_3_images(connector):
    model = build(connector).train()
    rows = [sample([], seed=1), sample([2], seed=2), sample([1, 4, 2], seed=3)]
    width = max(map(len, rows))
    ids = torch.full((3, width), 2)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    labels = ids.masked_fill(mask == 0, -100).masked_fill(ids == IMAGE, -100)
    out = model(ids, attention_mask=mask, pixel_values=pixels(4), labels=labels)
    assert out.image_hidden_states.shape == (4, PER_IMAGE, 64)
    out.loss.backward()
    connector_grads = [p.grad for p in model.model.multi_modal_projector.parameters()]
    tower_grads = [p.grad for p in model.model.vision_tower.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in connector_grads)
    assert any(g is not None and g.abs().sum() > 0 for g in tower_grads)
    text_only = model(ids[:1], attention_mask=mask[:1], labels=labels[:1])
    assert text_only.image_hidden_states is None and torch.isfinite(text_only.loss)


def test_image_embeddings_land_on_their_placeholders():
    model = build()
    ids = torch.tensor([sample([3, 2], seed=4)])
    first, second = pixels(2, seed=5)
    with torch.no_grad():
        base = model(ids, pixel_values=torch.stack([first, second])).logits[0]
        changed = model(ids, pixel_values=torch.stack([first, second + 1.0])).logits[0]
    second_start = (ids[0] == IMAGE).nonzero()[PER_IMAGE].item()
    differs = (base - changed).abs().amax(-1) > 1e-5
    assert not differs[:second_start].any()  # nothing before the second image sees it (causal)
    assert differs[second_start:].all()
    with torch.no_grad():
        features = model.get_image_features(torch.stack([first, second])).pooler_output
        embeds = model.model.get_input_embeddings()(ids)
        embeds[ids == IMAGE] = features.reshape(-1, 64)
        manual = model(inputs_embeds=embeds).logits[0]
    torch.testing.assert_close(manual, base, atol=1e-5, rtol=1e-4)


def test_generate_with_images_batched_left_padding_equals_single():
    model = build()
    rows = [sample([2], seed=6), sample([5, 1], seed=7)]
    images = [pixels(1, seed=8), pixels(2, seed=9)]
    width = max(map(len, rows))
    ids = torch.full((2, width), 2)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=2, eos_token_id=None)
    batched = model.generate(ids, attention_mask=mask, pixel_values=torch.cat(images), **kwargs)[:, width:]
    for i, row in enumerate(rows):
        single = model.generate(torch.tensor([row]), pixel_values=images[i], **kwargs)[0, len(row):]
        uncached = model.generate(torch.tensor([row]), pixel_values=images[i], use_cache=False, **kwargs)[0, len(row):]
        assert torch.equal(batched[i], single) and torch.equal(single, uncached)


def test_model_errors_name_the_problem():
    model = build()
    ids = torch.tensor([sample([2, 2])])
    with pytest.raises(ValueError, match=r"Got 3 images but 2 <image> placeholders"):
        model(ids, pixel_values=pixels(3))
    with pytest.raises(ValueError, match=r"9 image tokens"):
        model(torch.tensor([sample([2, 2]) + [IMAGE]]), pixel_values=pixels(2))
    with pytest.raises(ValueError, match=r"pixel_values must have shape \[num_images, 3, 32, 32\]"):
        model(ids, pixel_values=torch.randn(2, 3, 64, 64))
    with pytest.raises(ValueError, match=r"pixel_values must have shape"):
        model(ids, pixel_values=torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match=r"Got 0 images but 2 <image> placeholders"):
        model(ids)


def test_base_model_runs_placeholders_without_images_as_vllm_calls_it():
    """vLLM's Transformers backend runs the base model (AutoModel) on text-only batches, whose prompts may hold the
    placeholder id; raising there would stop the engine for every request, so only the generation class checks."""
    model = build()
    ids = torch.tensor([sample([2, 2])])
    hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
    assert hidden.shape == (1, ids.shape[1], model.config.text_config.hidden_size)
    with pytest.raises(ValueError, match=r"Got 0 images but 2 <image> placeholders"):
        model(ids, use_cache=False)


BAD_PIXELS = {
    "uint8": (lambda: (pixels(2) * 127 + 128).clamp(0, 255).to(torch.uint8), TypeError,
              "pixel_values must be rescaled and normalised floats, got torch.uint8"),
    "int64": (lambda: torch.zeros(2, 3, 32, 32, dtype=torch.long), TypeError, "got torch.int64"),
    "unnormalised 0-255": (lambda: (pixels(2) * 127 + 128).clamp(0, 255), ValueError,
                           r"pixel_values reach 255: pixel_values must be finite and normalised \(\|x\| <= 10\)"),
    "NaN": (lambda: pixels(2).index_put_((torch.tensor([1]),), torch.tensor(float("nan"))), ValueError,
            "pixel_values hold NaN or inf"),
    "inf": (lambda: pixels(2).index_put_((torch.tensor([0]),), torch.tensor(float("-inf"))), ValueError,
            "pixel_values hold NaN or inf"),
    "wrong size": (lambda: torch.randn(2, 3, 64, 64), ValueError,
                   r"pixel_values must have shape \[num_images, 3, 32, 32\]"),
    "wrong channels": (lambda: torch.randn(2, 1, 32, 32), ValueError, r"got \[2, 1, 32, 32\]"),
    "channels last": (lambda: torch.randn(2, 32, 32, 3), ValueError, r"got \[2, 32, 32, 3\]"),
    "one image, no batch dimension": (lambda: torch.randn(3, 32, 32), ValueError, "pixel_values must have shape"),
    "a list": (lambda: [torch.randn(3, 32, 32)] * 2, TypeError, "pixel_values must be a torch.Tensor"),
}


@pytest.mark.parametrize("case", list(BAD_PIXELS))
def test_bad_pixel_values_name_the_argument(case):
    make, error, message = BAD_PIXELS[case]
    model = build()
    ids = torch.tensor([sample([2, 2])])
    with pytest.raises(error, match=message):
        model(ids, pixel_values=make())
    with pytest.raises(error, match=message):
        model.get_image_features(make())


@pytest.mark.parametrize("case", ["ids", "embeds"])
def test_placeholder_count_is_checked_from_ids_and_from_embeddings(case):
    model = build()
    ids = torch.tensor([sample([2, 2])])
    inputs = {"input_ids": ids} if case == "ids" else {"inputs_embeds": model.get_input_embeddings()(ids)}
    with pytest.raises(ValueError, match="Got 1 images but 2 <image> placeholders"):
        model(**inputs, pixel_values=pixels(1))
    with pytest.raises(ValueError, match="Got 0 images but 2 <image> placeholders"):
        model(**inputs)


@pytest.mark.parametrize("feature_layer", [-1, -2])
def test_get_image_features_honours_output_flags(feature_layer):
    torch.manual_seed(0)
    config = tiny_vlm_config(vision_feature_layer=feature_layer, vision_config=dict(TINY_VISION, num_hidden_layers=2))
    model = randomize(AutoModelForImageTextToText.from_config(config, attn_implementation="eager")).eval()
    px = pixels(2)
    with torch.no_grad():
        plain = model.get_image_features(px)
        full = model.get_image_features(px, output_hidden_states=True, output_attentions=True)
        as_tuple = model.get_image_features(px, return_dict=False)
    assert plain.hidden_states is None and plain.attentions is None
    assert len(full.hidden_states) == 3 and len(full.attentions) == 2  # embeddings + 2 layers; 2 layers
    assert full.attentions[0].shape == (2, 2, 16, 16)  # [images, heads, patches, patches]
    torch.testing.assert_close(full.pooler_output, plain.pooler_output)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], plain.last_hidden_state)
    torch.testing.assert_close(as_tuple[1], plain.pooler_output)


def test_missing_tower_weights_get_siglip_init(tmp_path):
    """A checkpoint without the vision tower's weights: the language model and connector load, the tower gets what a
    new SiglipVisionModel of its config gets (xavier attention and MLP projections, near-zero MLP biases), not the
    language model's init."""
    wide = dict(TINY_VISION, hidden_size=256, intermediate_size=512, num_attention_heads=4)
    model = randomize(NanoVisionForConditionalGeneration(tiny_vlm_config(vision_config=wide)), seed=3)
    model.save_pretrained(tmp_path)
    weights = safetensors.torch.load_file(tmp_path / "model.safetensors")
    safetensors.torch.save_file({k: v for k, v in weights.items() if ".vision_tower." not in k},
                                tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = NanoVisionForConditionalGeneration.from_pretrained(tmp_path)
    for name, value in loaded.state_dict().items():
        if ".vision_tower." not in name:
            torch.testing.assert_close(value, model.state_dict()[name], msg=name)
    torch.manual_seed(0)
    reference = SiglipVisionModel(loaded.config.vision_config).state_dict()
    tower = loaded.model.vision_tower.state_dict()
    assert set(tower) == set(reference)
    for name, expected in reference.items():
        actual = tower[name]
        if expected.is_floating_point():
            assert abs(actual.std() - expected.std()) <= 0.1 * expected.std() + 1e-6, name
            assert abs(actual.mean() - expected.mean()) <= 0.1 * expected.std() + 1e-6, name
    fc1_bias = tower["encoder.layers.0.mlp.fc1.bias"]
    assert 0 < fc1_bias.std() < 1e-5  # SigLIP's normal(std=1e-6), where a Linear's own init would give zeros


def test_from_pretrained_components_refuses_what_is_not_its_part(tmp_path):
    torch.manual_seed(0)
    text = randomize(NanoVisionForCausalLM(tiny_text_config()))
    text.save_pretrained(tmp_path / "text")
    SiglipVisionModel(SiglipVisionConfig(**TINY_VISION)).save_pretrained(tmp_path / "siglip")
    vlm = build()
    vlm.save_pretrained(tmp_path / "vlm")
    with pytest.raises(ValueError, match=r"vision=.*vlm'\): a 'nanovision' checkpoint; vision must be a SigLIP"):
        NanoVisionForConditionalGeneration.from_pretrained_components(text=str(tmp_path / "text"),
                                                                      vision=str(tmp_path / "vlm"))
    with pytest.raises(ValueError, match=r"text=.*siglip'\): a 'siglip_vision_model' checkpoint; text must be"):
        NanoVisionForConditionalGeneration.from_pretrained_components(text=str(tmp_path / "siglip"),
                                                                      vision=str(tmp_path / "siglip"))
    # a VLM as the text part: its language model, exactly
    rebuilt = NanoVisionForConditionalGeneration.from_pretrained_components(text=str(tmp_path / "vlm"),
                                                                            vision=str(tmp_path / "siglip"))
    ids = torch.randint(10, 96, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids).logits, vlm(ids).logits)
    # a checkpoint of the right kind that lacks weights
    weights = safetensors.torch.load_file(tmp_path / "text" / "model.safetensors")
    safetensors.torch.save_file({k: v for k, v in weights.items() if "layers.1." not in k},
                                tmp_path / "text" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"text lacks \d+ weights the model needs \(model.layers.1"):
        NanoVisionForConditionalGeneration.from_pretrained_components(text=str(tmp_path / "text"),
                                                                      vision=str(tmp_path / "siglip"))


def test_from_text_model_checks_its_arguments():
    with pytest.raises(TypeError, match="from_text_model needs a NanoVisionForCausalLM"):
        NanoVisionForConditionalGeneration.from_text_model(SiglipVisionModel(SiglipVisionConfig(**TINY_VISION)),
                                                           SiglipVisionConfig(**TINY_VISION))
    with pytest.raises(TypeError, match="from_text_model needs a SiglipVisionConfig"):
        NanoVisionForConditionalGeneration.from_text_model(NanoVisionForCausalLM(tiny_text_config()),
                                                           tiny_text_config())


def test_freeze_helpers():
    model = build()
    model.set_trainable(vision_tower=False, language_model=False, connector=True)
    trainable = {n.split(".")[1] if n.startswith("model.") else n.split(".")[0]
                 for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"multi_modal_projector"}
    model.set_trainable(language_model=True)
    assert model.lm_head.weight.requires_grad and not next(model.model.vision_tower.parameters()).requires_grad


@pytest.mark.parametrize("connector", ["pixel_shuffle", "perceiver"])
def test_no_split_modules_name_only_blocks_the_model_has(connector):
    # Accelerate's FSDP auto-wrap (examples/accelerate/fsdp2.yaml) wraps these classes and fails on a missing one
    model = build(connector)
    present = {type(module).__name__ for module in model.modules()}
    assert {"NanoVisionDecoderLayer", "SiglipEncoderLayer"} <= set(model._no_split_modules) <= present


def test_connector_position_embedding(tmp_path):
    torch.manual_seed(0)
    plain = NanoVisionForConditionalGeneration(tiny_vlm_config()).eval()
    torch.manual_seed(0)
    model = NanoVisionForConditionalGeneration(tiny_vlm_config(connector_position_embedding=True)).eval()
    embedding = model.model.multi_modal_projector.position_embedding
    assert embedding.shape == (PER_IMAGE, 64) and not embedding.any()  # zero at the start: the plain connector
    px = pixels(2)
    with torch.no_grad():
        before = model.get_image_features(px).pooler_output
        torch.testing.assert_close(before, plain.get_image_features(px).pooler_output)
        embedding.copy_(torch.randn(PER_IMAGE, 64))
        after = model.get_image_features(px).pooler_output
    torch.testing.assert_close(after - before, embedding.expand(2, -1, -1))  # one vector per grid cell, every image
    ids = torch.tensor([sample([2])])
    randomize(model)(ids, pixel_values=pixels(1), labels=ids).loss.backward()  # (nanochat's init zeroes the head)
    assert embedding.grad is not None and embedding.grad.abs().sum() > 0
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert loaded.config.connector_position_embedding
    torch.testing.assert_close(loaded.model.multi_modal_projector.position_embedding, embedding)


def test_save_load_and_auto_classes(tmp_path):
    model = build("perceiver")
    model.save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModel"] == "modeling_nanovision.NanoVisionModel"
    assert auto_map["AutoModelForImageTextToText"] == "modeling_nanovision.NanoVisionForConditionalGeneration"
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    ids, px = torch.tensor([sample([1])]), pixels(1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, pixel_values=px).logits, model(ids, pixel_values=px).logits)
    assert isinstance(AutoModel.from_pretrained(tmp_path), NanoVisionModel)


def test_from_pretrained_components(tmp_path):
    torch.manual_seed(0)
    text = randomize(NanoVisionForCausalLM(tiny_text_config()))
    text.save_pretrained(tmp_path / "text")
    tower = randomize(SiglipVisionModel(SiglipVisionConfig(**TINY_VISION)), seed=1)  # with its pooling head
    tower.save_pretrained(tmp_path / "siglip")
    vlm = NanoVisionForConditionalGeneration.from_pretrained_components(
        text=str(tmp_path / "text"), vision=str(tmp_path / "siglip"), connector_type="perceiver",
        perceiver_num_queries=4, perceiver_num_heads=2)
    assert vlm.config.connector_type == "perceiver"
    ids = torch.randint(10, 96, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(vlm(ids).logits, text(ids).logits)
        px = pixels(2)
        expected = tower(px).last_hidden_state
        torch.testing.assert_close(vlm.model.vision_tower(px).last_hidden_state, expected)


def test_remote_code_vlm_without_nanovision(tmp_path, no_nanovision_env):
    model = build()
    model.save_pretrained(tmp_path / "ckpt")
    row = sample([2])
    with torch.no_grad():
        expected = model.generate(torch.tensor([row]), pixel_values=pixels(1), max_new_tokens=5, do_sample=False,
                                  pad_token_id=2, eos_token_id=None)
    code = f"""
import torch
from transformers import AutoModelForImageTextToText
model = AutoModelForImageTextToText.from_pretrained({str(tmp_path / "ckpt")!r}, trust_remote_code=True).eval()
px = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
out = model.generate(torch.tensor([{row}]), pixel_values=px, max_new_tokens=5, do_sample=False, pad_token_id=2,
                     eos_token_id=None)
print(out.tolist())
"""
    assert run_without_nanovision(code, no_nanovision_env, cwd=tmp_path).strip().splitlines()[-1] == str(expected.tolist())


@pytest.fixture(scope="module")
def vlm_checkpoint(tmp_path_factory):
    """A saved VLM + processor folder, built the way training saves one."""
    from PIL import Image

    from nanovision import NanoVisionImageProcessor, NanoVisionProcessor
    from nanovision.tokenizer import train_tokenizer

    words = ["red", "green", "blue", "circle", "square", "what", "color", "is", "the", "a", "shape"]
    tokenizer = train_tokenizer([" ".join(words[i:] + words[:i]) for i in range(len(words))] * 20, vocab_size=300)
    config = tiny_vlm_config(text=tiny_text_config(vocab_size=len(tokenizer)))
    torch.manual_seed(0)
    model = randomize(NanoVisionForConditionalGeneration(config), std=0.1).eval()
    processor = NanoVisionProcessor(NanoVisionImageProcessor(size={"height": 32, "width": 32}), tokenizer,
                                    num_image_tokens=config.num_image_tokens)
    path = tmp_path_factory.mktemp("vlm")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    image = Image.new("RGB", (50, 40), (220, 30, 30))
    image.save(path / "red.png")
    return path


USER_FLOW = """
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
proc = AutoProcessor.from_pretrained(CKPT, **KW)
model = AutoModelForImageTextToText.from_pretrained(CKPT, **KW).eval()
msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the circle?"}]}]
prompt = proc.apply_chat_template(msgs, add_generation_prompt=True)
inputs = proc(text=prompt, images=[Image.open(CKPT + "/red.png")], return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=8, do_sample=False, eos_token_id=None)
print(type(model).__module__, out[0, inputs["input_ids"].shape[1]:].tolist(), repr(proc.decode(out[0])), sep="\t")
"""


def test_user_flow_with_auto_processor_and_model(vlm_checkpoint, capsys):
    exec(USER_FLOW.replace("CKPT", repr(str(vlm_checkpoint))).replace("**KW", ""), {})
    module, new_tokens, text = capsys.readouterr().out.strip().split("\t")
    assert module == "nanovision.modeling_nanovision" and len(eval(new_tokens)) == 8
    assert text.startswith("'<|bos|><|user|><|image_start|><image>")


def test_user_flow_as_remote_code_without_nanovision(vlm_checkpoint, tmp_path, no_nanovision_env, capsys):
    exec(USER_FLOW.replace("CKPT", repr(str(vlm_checkpoint))).replace("**KW", ""), {})
    expected_tokens = capsys.readouterr().out.strip().split("\t")[1]
    code = USER_FLOW.replace("CKPT", repr(str(vlm_checkpoint))).replace("**KW", "trust_remote_code=True")
    module, new_tokens, _ = run_without_nanovision(code, no_nanovision_env, cwd=tmp_path).strip().splitlines()[-1].split("\t")
    assert module.startswith("transformers_modules") and new_tokens == expected_tokens

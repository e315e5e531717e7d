import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    probe_inputs,
    randomize,
    run_without_nanovision,
    tiny_text_config,
    tiny_vlm_config,
)
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM

from nanovision import (
    NanoVisionForCausalLM,
    NanoVisionForConditionalGeneration,
    NanoVisionTextModel,
)
from nanovision.modeling_nanovision import NanoVisionDecoderLayer

BLOCKS = {
    "llama": dict(),
    "nanochat": dict(mlp_type="relu2", norm_weights=False, embedding_norm=True, qk_norm="parameter_free",
                     final_logit_softcapping=15.0, num_key_value_heads=4),
    "qwen": dict(qk_norm="learnable", attention_bias=True, tie_word_embeddings=True),
    "mqa": dict(num_key_value_heads=1, head_dim=32),
}


def build(block="llama", attn="eager", seed=0, **overrides):
    config = tiny_text_config(**{**BLOCKS[block], **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    return randomize(model, seed=seed).eval()


def test_nanochat_init_zeroes_output_projections():
    model = AutoModelForCausalLM.from_config(tiny_text_config(embedding_norm=True))
    layer = model.model.layers[0]
    assert layer.self_attn.o_proj.weight.abs().sum() == 0 and layer.mlp.down_proj.weight.abs().sum() == 0
    assert model.lm_head.weight.abs().sum() == 0
    assert layer.self_attn.q_proj.weight.std() > 0
    assert abs(model.model.embed_tokens.weight.std().item() - 1.0) < 0.1
    tied = AutoModelForCausalLM.from_config(tiny_text_config(tie_word_embeddings=True))
    assert tied.lm_head.weight is tied.model.embed_tokens.weight and tied.lm_head.weight.std() > 0


# ---------------------------------------------------------------- attention backends, packing, cache


@pytest.mark.parametrize("block", list(BLOCKS))
@pytest.mark.parametrize("attn", ["sdpa", "flex_attention", "nanovision_varlen"])
def test_backends_agree_with_eager(block, attn):
    ids = torch.randint(0, 96, (2, 17), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding exercises the padding mask
    model = build(block)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        model.set_attn_implementation(attn)
        assert model.config._attn_implementation == attn
        actual = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(actual[mask.bool()], expected[mask.bool()], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("padded", [False, True])
def test_varlen_attention_with_a_cache(padded):
    """nanovision_varlen serves generation too: a multi-token continuation and single-token steps against a cache
    (through SDPA, causal to the cached past), with and without left padding."""
    ids = torch.randint(0, 96, (2, 14), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0 if padded else 1
    expected = build("nanochat", attn="eager")
    model = build("nanochat", attn="nanovision_varlen")
    with torch.no_grad():
        outputs = []
        for m in (expected, model):
            prefill = m(ids[:, :10], attention_mask=mask[:, :10], use_cache=True)
            step = m(ids[:, 10:], attention_mask=mask, past_key_values=prefill.past_key_values)
            outputs.append(torch.cat([prefill.logits, step.logits], 1))
        greedy = [m.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False) for m in (expected, model)]
    torch.testing.assert_close(outputs[1][mask.bool()], outputs[0][mask.bool()], atol=2e-5, rtol=1e-4)
    assert torch.equal(greedy[0], greedy[1])


@pytest.mark.parametrize("attn", ["eager", "sdpa", "flex_attention", "nanovision_varlen"])
def test_packed_row_equals_documents_run_alone(attn):
    model = build("nanochat", attn=attn)
    gen = torch.Generator().manual_seed(2)
    docs = [torch.randint(0, 96, (n,), generator=gen) for n in (5, 9, 3)]
    packed = torch.cat(docs)[None]
    position_ids = torch.cat([torch.arange(len(d)) for d in docs])[None]
    with torch.no_grad():
        packed_logits = model(packed, position_ids=position_ids).logits[0]
        alone = torch.cat([model(d[None]).logits[0] for d in docs])
    torch.testing.assert_close(packed_logits, alone, atol=2e-5, rtol=1e-4)


def test_packed_loss_and_grads_equal_unpacked():
    model = build("llama", attn="sdpa").train()
    gen = torch.Generator().manual_seed(3)
    docs = [torch.randint(0, 96, (n,), generator=gen) for n in (6, 10)]
    packed = torch.cat(docs)[None]
    position_ids = torch.cat([torch.arange(len(d)) for d in docs])[None]
    labels = packed.clone()
    labels[0, len(docs[0])] = -100  # the first token of a document is never predicted from the previous one
    model(packed, position_ids=position_ids, labels=labels).loss.backward()
    packed_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    total = sum(len(d) - 1 for d in docs)
    for doc in docs:
        out = model(doc[None], labels=doc[None], num_items_in_batch=torch.tensor(total))
        out.loss.backward()
    for packed_grad, param in zip(packed_grads, model.parameters()):
        torch.testing.assert_close(packed_grad, param.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("block", ["llama", "nanochat"])
def test_generate_with_cache_equals_without(block):
    model = build(block, attn="sdpa")
    prompt = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(4))
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=2, eos_token_id=None)
    cached = model.generate(prompt, **kwargs)
    uncached = model.generate(prompt, use_cache=False, **kwargs)
    static = model.generate(prompt, cache_implementation="static", **kwargs)
    assert cached.shape == (1, 18)
    assert torch.equal(cached, uncached) and torch.equal(cached, static)


def test_batched_left_padded_generate_equals_single():
    model = build("llama", attn="sdpa")
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 96, (n,), generator=gen) for n in (7, 4)]
    batch = torch.full((2, 7), 2)
    mask = torch.zeros((2, 7), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        batch[row, 7 - len(prompt):] = prompt
        mask[row, 7 - len(prompt):] = 1
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=2, eos_token_id=None)
    batched = model.generate(batch, attention_mask=mask, **kwargs)[:, 7:]
    for row, prompt in enumerate(prompts):
        assert torch.equal(batched[row], model.generate(prompt[None], **kwargs)[0, len(prompt):])



@pytest.mark.parametrize("attn", ["eager", "sdpa", "flex_attention"])
def test_packed_rows_with_a_padding_mask_equal_documents_run_alone(attn):
    """position_ids restarting at 0 and a 2D attention_mask together: the documents stay apart and the padding is
    masked (transformers alone reads the documents only without an attention_mask)."""
    model = build("nanochat", attn=attn)
    gen = torch.Generator().manual_seed(12)
    rows = [[torch.randint(0, 96, (n,), generator=gen) for n in lengths] for lengths in ((5, 7), (4, 3, 2))]
    width = max(sum(map(len, docs)) for docs in rows) + 2  # both rows end in padding
    ids = torch.full((2, width), 2)
    position_ids = torch.zeros((2, width), dtype=torch.long)
    mask = torch.zeros((2, width), dtype=torch.long)
    for r, docs in enumerate(rows):
        n = sum(map(len, docs))
        ids[r, :n] = torch.cat(docs)
        position_ids[r, :n] = torch.cat([torch.arange(len(d)) for d in docs])
        position_ids[r, n:] = torch.arange(width - n)
        mask[r, :n] = 1
    with torch.no_grad():
        packed = model(ids, position_ids=position_ids, attention_mask=mask).logits
        for r, docs in enumerate(rows):
            alone = torch.cat([model(d[None]).logits[0] for d in docs])
            torch.testing.assert_close(packed[r, : len(alone)], alone, atol=2e-5, rtol=1e-4)
        without_mask = model(ids, position_ids=position_ids).logits
    torch.testing.assert_close(packed[mask.bool()], without_mask[mask.bool()], atol=2e-5, rtol=1e-4)


LONG_IDS = torch.ones(2, 5, dtype=torch.long)
BAD_TEXT_INPUTS = {
    "ids >= vocab_size": (dict(input_ids=torch.tensor([[3, 96, 4]])), ValueError,
                          r"ids from 3 to 96: input_ids must be token ids in \[0, vocab_size=96\)"),
    "negative ids": (dict(input_ids=torch.tensor([[3, -100, 4]])), ValueError, "input_ids must be token ids in"),
    "1-D ids": (dict(input_ids=torch.tensor([3, 4])), ValueError,
                r"input_ids must be \[batch_size, sequence_length\].*input_ids\[None\]"),
    "3-D ids": (dict(input_ids=torch.ones(2, 3, 4, dtype=torch.long)), ValueError,
                r"input_ids must be \[batch_size, sequence_length\], got shape \[2, 3, 4\]"),
    "float ids": (dict(input_ids=torch.ones(1, 4)), TypeError, "input_ids must hold integers"),
    "empty batch": (dict(input_ids=torch.ones(0, 4, dtype=torch.long)), ValueError, "input_ids is empty"),
    "empty rows": (dict(input_ids=torch.ones(2, 0, dtype=torch.long)), ValueError, "input_ids is empty"),
    "position_ids too short": (dict(input_ids=LONG_IDS, position_ids=torch.arange(4)[None]), ValueError,
                               r"position_ids must be \[batch_size, sequence_length\] = \[2, 5\]"),
    "position_ids of another batch": (dict(input_ids=LONG_IDS, position_ids=torch.arange(5).repeat(3, 1)),
                                      ValueError, "position_ids must be"),
    "1-D position_ids": (dict(input_ids=LONG_IDS[:1], position_ids=torch.arange(5)), ValueError,
                         r"position_ids must be .*position_ids\[None\]"),
    "float position_ids": (dict(input_ids=LONG_IDS, position_ids=torch.zeros(2, 5)), TypeError,
                           "position_ids must hold integers"),
    "attention_mask of another batch": (dict(input_ids=LONG_IDS, attention_mask=torch.ones(3, 5)), ValueError,
                                        r"attention_mask \(2D\) must be"),
    "inputs_embeds of another width": (dict(inputs_embeds=torch.randn(1, 4, 32)), ValueError,
                                       "inputs_embeds must be .*hidden_size=64"),
}


@pytest.mark.parametrize("case", list(BAD_TEXT_INPUTS))
def test_bad_forward_inputs_name_the_argument(case):
    inputs, error, message = BAD_TEXT_INPUTS[case]
    model = build("llama", attn="sdpa")
    with pytest.raises(error, match=message):
        model(**inputs)


# ---------------------------------------------------------------- training features


@pytest.mark.parametrize("block", ["nanochat", "llama"])
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_same_grads(block, use_reentrant):
    """Also through the next layer's input norm that each layer runs (and its weights, in Llama's block)."""
    model = build(block, attn="sdpa").train()
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(6))
    model(ids, labels=ids).loss.backward()
    reference = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert model.model.layers[0].gradient_checkpointing
    model(ids, labels=ids).loss.backward()
    for expected, param in zip(reference, model.parameters()):
        torch.testing.assert_close(param.grad, expected)


def next_norms_given(model):
    """A list that records, on each later call of `model`, the `next_norm` that each decoder layer is given."""
    given = []
    for layer in model.model.layers:
        layer.register_forward_pre_hook(lambda module, args, kwargs: given.append(kwargs["next_norm"]),
                                        with_kwargs=True)
    return given


def forward_and_grads(model, ids):
    out = model(ids, labels=ids, output_hidden_states=True)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    return out, grads


@pytest.mark.parametrize("block", ["llama", "nanochat"])
def test_each_layer_runs_the_next_input_norm_with_its_last_residual_add(monkeypatch, block):
    """Layer i ends with layer i + 1's input norm (the final norm after the last layer) fused with its residual add;
    the hidden states a user records, the logits and every gradient are those of the layers each norming their own
    input (what wrapped layers do)."""
    import nanovision.modeling_nanovision as modeling

    model = build(block).train()
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(12))
    given = next_norms_given(model)
    shared, shared_grads = forward_and_grads(model, ids)
    layers = model.model.layers
    assert given == [layer.input_layernorm for layer in layers[1:]] + [model.model.norm]
    given.clear()
    monkeypatch.setattr(modeling, "_wrapped", lambda layer: True)
    own, own_grads = forward_and_grads(model, ids)
    assert given == [None] * len(layers)
    assert len(shared.hidden_states) == len(layers) + 1
    for a, b in zip(shared.hidden_states + (shared.logits,), own.hidden_states + (own.logits,)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for name, grad in own_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, rtol=0, atol=0, msg=name)


def test_an_fsdp_unit_norms_its_own_input():
    """FSDP gathers a unit's weights only inside that unit's forward: no layer borrows the norm of a layer that is
    one (the class that torch's fully_shard gives it), and the outputs are the same."""
    from torch.distributed.fsdp import FSDPModule

    model = build("llama")
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(13))
    expected = model(ids).logits
    given = next_norms_given(model)
    layer = model.model.layers[1]
    layer.__class__ = type("FSDPNanoVisionDecoderLayer", (FSDPModule, type(layer)), {})
    torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=0)
    assert given == [None] * len(model.model.layers)


def test_loss_uses_num_items_in_batch_and_logits_to_keep():
    model = build("nanochat")
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(7))
    labels = ids.clone()
    labels[0, :4] = -100
    out = model(ids, labels=labels)
    logits = out.logits.float()
    targets = labels[:, 1:].reshape(-1)
    per_token = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 96), targets, ignore_index=-100,
                                                  reduction="none")
    torch.testing.assert_close(out.loss, per_token.sum() / (targets != -100).sum())
    summed = model(ids, labels=labels, num_items_in_batch=torch.tensor(100)).loss
    torch.testing.assert_close(summed, per_token.sum() / 100)
    assert logits.abs().max() <= 15.0  # softcap
    last = model(ids, logits_to_keep=1).logits
    assert last.shape == (2, 1, 96)
    torch.testing.assert_close(last[:, 0], out.logits[:, -1])


def test_torch_compile_forward_runs():
    model = build("llama", attn="sdpa")
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        expected = model(ids).logits
        compiled = torch.compile(model)
        torch.testing.assert_close(compiled(ids).logits, expected, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- saving and remote code


def test_save_load_round_trip_safetensors(tmp_path):
    model = build("qwen")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert (tmp_path / "modeling_nanovision.py").exists() and (tmp_path / "configuration_nanovision.py").exists()
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModel"].endswith("NanoVisionTextModel")
    assert auto_map["AutoModelForCausalLM"].endswith("NanoVisionForCausalLM")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, NanoVisionForCausalLM)
    ids = torch.randint(0, 96, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    base = AutoModel.from_pretrained(tmp_path)
    assert isinstance(base, NanoVisionTextModel)


def test_remote_code_loads_without_nanovision(tmp_path, no_nanovision_env):
    model = build("nanochat")
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=2, eos_token_id=None)
    code = f"""
import torch
from transformers import AutoModelForCausalLM, AutoModel
model = AutoModelForCausalLM.from_pretrained({str(ckpt)!r}, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
out = model.generate(torch.tensor({ids.tolist()}), max_new_tokens=6, do_sample=False, pad_token_id=2, eos_token_id=None)
print(out.tolist())
base = AutoModel.from_pretrained({str(ckpt)!r}, trust_remote_code=True)
print(type(base).__name__)
"""
    stdout = run_without_nanovision(code, no_nanovision_env, cwd=tmp_path).strip().splitlines()
    assert stdout[-2] == str(expected.tolist())
    assert stdout[-1] == "NanoVisionTextModel"


# ---------------------------------------------------------------- tensor parallelism

TP_STYLES = {"q_proj": "colwise", "k_proj": "colwise", "v_proj": "colwise", "gate_proj": "colwise",
             "up_proj": "colwise", "o_proj": "rowwise", "down_proj": "rowwise"}


def tp_rules(plan, name):
    """The plan's rules for a module name, '*' standing for a layer index as transformers reads them (vLLM's
    Transformers backend matches the same patterns, as regexes, against the base model's module names)."""
    return [pattern for pattern in plan if re.fullmatch(re.escape(pattern).replace(r"\*", r"\d+"), name)]


def test_tensor_parallel_plan_covers_every_linear_of_the_decoder_layers():
    planned, used = set(), set()
    for block in ("llama", "nanochat", "qwen"):
        vlm = NanoVisionForConditionalGeneration(tiny_vlm_config(tiny_text_config(**BLOCKS[block])))
        for model in (build(block), vlm):
            base = model.model  # what vLLM shards, by base.tp_plan
            modules = dict(base.named_modules())
            layers = tuple(f"{name}." for name, module in modules.items()
                           if isinstance(module, NanoVisionDecoderLayer))
            linears = [name for name, module in modules.items()
                       if isinstance(module, nn.Linear) and name.startswith(layers)]
            assert len(linears) >= 2 * len(layers), block
            for name in linears:  # a new linear in the block must be added to the plan, and to TP_STYLES
                rules = tp_rules(base.tp_plan, name)
                assert len(rules) == 1 and base.tp_plan[rules[0]] == TP_STYLES[name.rsplit(".", 1)[-1]], name
            planned.update(base.tp_plan)
            used.update(rule for name in modules for rule in tp_rules(base.tp_plan, name))
            assert model.tp_plan["lm_head"] == "colwise_gather_output"
    assert used == planned  # and no rule names a module that no block has


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_tensor_parallel_two_processes_match_one(tmp_path):
    """transformers' tp_size=2 on 2 gloo processes gives the unsharded logits and gradients (tests/
    tensor_parallel_run.py): untied, tied + learnable QK-norm + biases, nanochat's block, and a VLM."""
    checkpoints = []
    for block in ("llama", "qwen", "nanochat"):
        build(block).save_pretrained(tmp_path / block)
        checkpoints.append(tmp_path / block)
    randomize(NanoVisionForConditionalGeneration(tiny_vlm_config(tiny_text_config(**BLOCKS["qwen"])))).save_pretrained(
        tmp_path / "vlm")
    checkpoints.append(tmp_path / "vlm")
    script = Path(__file__).with_name("tensor_parallel_run.py")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
                          *map(str, checkpoints)], check=False, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]


# ---------------------------------------------------------------- GPU: validation without host-device syncs

ON_CUDA = os.environ.get("NANOVISION_TEST_CUDA", "0") == "1" and torch.cuda.is_available()


@pytest.mark.skipif(not ON_CUDA, reason="set NANOVISION_TEST_CUDA=1 on a machine with CUDA")
@pytest.mark.parametrize("kind", ["text", "text packed with a padding mask", "vlm"])
def test_training_step_adds_no_host_device_sync(kind):
    """The forward's input checks (ids, positions, pixels, image placeholders) queue their value checks on the
    device: a whole training step (forward, backward, optimizer) runs under sync debug mode "error"."""
    torch.manual_seed(0)
    if kind == "vlm":
        config = tiny_vlm_config()
        model = randomize(NanoVisionForConditionalGeneration(config))
        inputs = probe_inputs(config)
        inputs["labels"] = inputs["input_ids"].masked_fill(inputs["input_ids"] == config.image_token_id, -100)
    else:
        model = build("nanochat", attn="sdpa")
        ids = torch.randint(3, 96, (2, 16), generator=torch.Generator().manual_seed(13))
        inputs = {"input_ids": ids, "labels": ids}
        if kind != "text":
            inputs["position_ids"] = torch.cat([torch.arange(6), torch.arange(10)]).repeat(2, 1)
            inputs["attention_mask"] = torch.ones_like(ids).index_fill_(1, torch.tensor([14, 15]), 0)
    model = model.cuda().train()
    inputs = {name: value.cuda() for name, value in inputs.items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step()  # first-call setup (cuBLAS handles, allocator) may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()

"""Packed rows through the packed-attention backends equal the documents run one by one (GPU only), eager and
compiled.

Runs with NANOVISION_TEST_CUDA=1 on a CUDA machine, for nanovision's own Triton `nanovision_varlen` and each flash
backend whose package is installed: flash_attention_4 needs `flash-attn-4` (CuTe DSL, Hopper or newer),
flash_attention_2 `flash-attn`. Documents of several lengths are
packed into two rows of unequal length (so the shorter row is padded) by PackedDataCollator with the flash kwargs;
every document's logits and the parameter gradients of the summed loss are compared with the same weights running
each document alone through SDPA.
"""

import os

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize, tiny_text_config, tiny_vlm_config
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
from transformers.utils import is_flash_attn_2_available, is_flash_attn_4_available

from nanovision.training.collator import PackedDataCollator

if os.environ.get("NANOVISION_TEST_CUDA", "0") != "1" or not torch.cuda.is_available():
    pytest.skip("flash attention needs NANOVISION_TEST_CUDA=1 and a CUDA device", allow_module_level=True)

BACKENDS = [
    "nanovision_varlen",
    pytest.param("flash_attention_2", marks=pytest.mark.skipif(not is_flash_attn_2_available(),
                                                               reason="flash-attn is not installed")),
    pytest.param("flash_attention_4", marks=pytest.mark.skipif(not is_flash_attn_4_available(),
                                                               reason="flash-attn-4 is not installed")),
]
# flash kernels want head widths of 64 or more; 2 query heads a kv head
TEXT = dict(vocab_size=96, hidden_size=256, intermediate_size=384, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256)
VISION = dict(image_size=32, patch_size=8, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
              num_attention_heads=2)
ROWS = [[37, 64, 5, 81], [100, 18, 29]]  # document lengths; the second row is shorter, so padded
IMAGE_TOKEN_ID = 6


def rel_error(got, want):
    return float((got.float() - want.float()).norm() / want.float().norm())


def summed_loss(logits, labels):
    targets = F.pad(labels, (0, 1), value=-100)[..., 1:]
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")


def documents(image_tokens=0, image_size=None, seed=0, rows=ROWS):
    """One dict a document of `rows`: input_ids (an image's placeholders first, for a VLM), labels, pixel_values."""
    generator = torch.Generator().manual_seed(seed)
    docs = []
    for lengths in rows:
        for length in lengths:
            ids = torch.randint(IMAGE_TOKEN_ID + 1, TEXT["vocab_size"], (length + image_tokens,), generator=generator)
            ids[:image_tokens] = IMAGE_TOKEN_ID
            labels = ids.clone()
            labels[:image_tokens] = -100
            doc = dict(input_ids=ids, labels=labels)
            if image_tokens:
                doc["pixel_values"] = torch.randn(1, 3, image_size, image_size, generator=generator)
            docs.append(doc)
    return docs


def packed_batch(docs, rows=ROWS):
    features, start = [], 0
    for lengths in rows:
        members = docs[start:start + len(lengths)]
        start += len(lengths)
        feature = dict(input_ids=torch.cat([d["input_ids"] for d in members]),
                       labels=torch.cat([d["labels"] for d in members]),
                       seq_lengths=[d["input_ids"].numel() for d in members])
        if "pixel_values" in members[0]:
            feature["pixel_values"] = torch.cat([d["pixel_values"] for d in members])
        features.append(feature)
    return PackedDataCollator(return_flash_attn_kwargs=True)(features)


def check_packed_equals_separate(build, attn, docs, compiled=False):
    """build(attn) -> the model, same weights for every attn; compares logits and gradients. compiled: the packed
    model runs under torch.compile, compiled afresh (the earlier cases' recompilations would make this one's shapes
    dynamic; see benchmarks/RESULTS.md, 2026-12-02, on torch 2.11's inductor)."""
    device = torch.device("cuda")
    if compiled:
        torch._dynamo.reset()
    reference, flash = build("sdpa").to(device).train(), build(attn).to(device).train()
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in packed_batch(docs).items()}
    labels = batch.pop("labels")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        packed_logits = (torch.compile(flash) if compiled else flash)(**batch).logits
    summed_loss(packed_logits, labels).backward()

    separate_logits = []
    for doc in docs:
        inputs = {k: v[None] if k != "pixel_values" else v for k, v in doc.items() if k != "labels"}
        inputs = {k: v.to(device) for k, v in inputs.items()}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = reference(**inputs).logits
        summed_loss(logits, doc["labels"][None].to(device)).backward()
        separate_logits.append(logits[0])

    start = 0
    for row, lengths in enumerate(ROWS):
        offset = 0
        for length in lengths:
            doc_logits = separate_logits[start]
            n = doc_logits.shape[0]
            error = rel_error(packed_logits[row, offset:offset + n], doc_logits)
            assert error < 2e-2, f"{attn}: row {row} document {start}: logits differ by {error:.2e}"
            offset += n
            start += 1
    # a key bias adds the same q.b to every score of a query, which softmax cancels: its gradient is zero up to
    # rounding in both runs, and their relative difference is noise over noise
    grads = {name: p.grad for name, p in flash.named_parameters() if p.grad is not None and "k_proj.bias" not in name}
    want = {name: p.grad for name, p in reference.named_parameters()
            if p.grad is not None and "k_proj.bias" not in name}
    assert grads.keys() == want.keys()
    total = rel_error(torch.cat([g.flatten() for g in grads.values()]), torch.cat([g.flatten() for g in want.values()]))
    worst = max(grads, key=lambda name: rel_error(grads[name], want[name]))
    print(f"{attn}: gradients differ by {total:.2e} overall, worst {worst} {rel_error(grads[worst], want[worst]):.2e}")
    assert total < 2e-2
    assert rel_error(grads[worst], want[worst]) < 1e-1, worst


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("fused", [False, True], ids=["eager-ops", "fused-kernels"])
@pytest.mark.parametrize("attn", BACKENDS)
def test_packed_text_rows_match_separate_documents(attn, fused, compiled):
    config = lambda: tiny_text_config(**TEXT, use_fused_kernels=fused)  # noqa: E731

    def build(implementation):
        return randomize(AutoModelForCausalLM.from_config(config(), attn_implementation=implementation), std=0.05)

    check_packed_equals_separate(build, attn, documents(), compiled)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("fused", [False, True], ids=["eager-ops", "fused-kernels"])
@pytest.mark.parametrize("attn", BACKENDS)
def test_packed_vlm_rows_match_separate_documents(attn, fused, compiled):
    def config():
        return tiny_vlm_config(text=tiny_text_config(**TEXT, use_fused_kernels=fused), vision_config=dict(VISION),
                               image_token_id=IMAGE_TOKEN_ID)

    def build(implementation):
        return randomize(AutoModelForImageTextToText.from_config(config(), attn_implementation=implementation),
                         std=0.05)

    check_packed_equals_separate(build, attn, documents(config().num_image_tokens, VISION["image_size"]), compiled)


@pytest.mark.parametrize("vlm", [False, True], ids=["text", "vlm"])
def test_varlen_attention_compiles_without_graph_breaks(vlm):
    """The Triton varlen kernels are torch.library ops: a compiled packed model is one graph, with no break at each
    attention (whose host time an eager step pays per layer)."""
    text = tiny_text_config(**TEXT)
    if vlm:
        config = tiny_vlm_config(text=text, vision_config=dict(VISION), image_token_id=IMAGE_TOKEN_ID)
        model = AutoModelForImageTextToText.from_config(config, attn_implementation="nanovision_varlen").model
        docs = documents(config.num_image_tokens, VISION["image_size"])
    else:
        model = AutoModelForCausalLM.from_config(text, attn_implementation="nanovision_varlen").model
        docs = documents()
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in packed_batch(docs).items() if k != "labels"}
    explanation = torch._dynamo.explain(model.cuda())(**batch)
    assert explanation.graph_break_count == 0, explanation.break_reasons


# batches whose row count, row lengths, document count and longest document all change from step to step
CHANGING_ROWS = ([[37, 64, 5, 81], [100, 18, 29]], [[12, 90], [40, 40, 40, 7], [9]], [[150], [3, 3, 60, 20, 9]],
                 [[70, 70, 47]])


@pytest.mark.parametrize("vlm", [False, True], ids=["text", "vlm"])
def test_compiled_varlen_training_with_changing_batches(vlm):
    """One compiled packed model (fused kernels, nanovision_varlen) trained on batches whose shapes and documents
    change, as a user's packed run does: dynamo recompiles with dynamic shapes after the first change, and every
    step's logits and gradients must equal the same weights run eagerly (to bf16 rounding, as in the tests above)."""
    torch._dynamo.reset()
    text = tiny_text_config(**TEXT, use_fused_kernels=True)
    if vlm:
        config = tiny_vlm_config(text=text, vision_config=dict(VISION), image_token_id=IMAGE_TOKEN_ID)
        auto_class, image_tokens = AutoModelForImageTextToText, config.num_image_tokens
        image_size = VISION["image_size"]
    else:
        config, auto_class, image_tokens, image_size = text, AutoModelForCausalLM, 0, None

    def build():
        return auto_class.from_config(config, attn_implementation="nanovision_varlen")

    eager = randomize(build(), std=0.05).cuda().train()
    model = build().cuda().train()
    model.load_state_dict(eager.state_dict())
    compiled = torch.compile(model)
    for step, rows in enumerate(CHANGING_ROWS):
        batch = packed_batch(documents(image_tokens, image_size, seed=step, rows=rows), rows)
        batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
        labels = batch.pop("labels")
        logits = {}
        for name, net in (("compiled", compiled), ("eager", eager)):
            net.zero_grad()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits[name] = net(**batch).logits
            summed_loss(logits[name], labels).backward()
        error = rel_error(logits["compiled"], logits["eager"])
        assert error < 2e-2, f"step {step}: compiled logits differ from eager by {error:.2e}"
        grads = [(p.grad, q.grad) for (name, p), q in zip(model.named_parameters(), eager.parameters())
                 if p.grad is not None and "k_proj.bias" not in name]
        total = rel_error(torch.cat([g.flatten() for g, _ in grads]), torch.cat([w.flatten() for _, w in grads]))
        assert total < 2e-2, f"step {step}: compiled gradients differ from eager by {total:.2e}"

import itertools
import logging

import numpy as np
import pytest
import torch
from conftest import randomize, tiny_text_config, tiny_vlm_config
from datasets import Dataset

from nanovision.training.collator import PackedDataCollator
from nanovision.training.dataset_packing import PackingStats, pack_dataset

IMG, START, END = 6, 7, 8  # image placeholder ids (tiny_vlm_config uses image_token_id=6)


# ---------------------------------------------------------------------------------------------- pack_dataset


def make_examples(n, seed=0, max_len=40):
    """Examples with a unique first token (100 + index) and a masked prompt; token 6-8 never appear."""
    rng = np.random.default_rng(seed)
    examples = []
    for index in range(n):
        length = int(rng.integers(2, max_len + 1))
        ids = [100 + index] + rng.integers(10, 90, size=length - 1).tolist()
        prompt = int(rng.integers(0, length))
        examples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return examples


def split_documents(row):
    """Cut a packed row back into its documents with seq_lengths."""
    out, start = [], 0
    for length in row["seq_lengths"]:
        out.append({key: row[key][start : start + length] for key in ("input_ids", "labels", "position_ids")})
        start += length
    assert start == len(row["input_ids"])
    return out


def test_pack_dataset_rows_labels_positions():
    examples = make_examples(60)
    dataset = Dataset.from_list([dict(e, text="dropped") for e in examples])
    packed, stats = pack_dataset(dataset, 64)
    assert set(packed.column_names) == {"input_ids", "labels", "position_ids", "seq_lengths"}
    assert isinstance(stats, PackingStats)
    assert stats.examples_in == 60 and stats.rows_out == len(packed) and stats.truncated_examples == 0
    assert stats.tokens == sum(len(e["input_ids"]) for e in examples)
    assert stats.compression_ratio == pytest.approx(60 / len(packed))
    assert stats.padding_waste_after == pytest.approx(1 - stats.tokens / (len(packed) * 64))
    assert stats.padding_waste_before == pytest.approx(1 - stats.tokens / (60 * 64))
    assert stats.as_dict()["padding_waste_after"] == stats.padding_waste_after
    seen = set()
    for row in packed:
        assert len(row["input_ids"]) <= 64
        for doc in split_documents(row):
            index = doc["input_ids"][0] - 100
            seen.add(index)
            original = examples[index]
            assert doc["input_ids"] == original["input_ids"]
            assert doc["position_ids"] == list(range(len(doc["input_ids"])))
            assert doc["labels"] == [-100] + original["labels"][1:]  # document start never predicted
    assert seen == set(range(60))


def test_pack_dataset_labels_default_to_input_ids():
    packed, _ = pack_dataset(Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5]]}), 8, log_stats=False)
    assert packed[0]["input_ids"] == [1, 2, 3, 4, 5]
    assert packed[0]["labels"] == [-100, 2, 3, -100, 5]
    assert packed[0]["position_ids"] == [0, 1, 2, 0, 1]
    assert packed[0]["seq_lengths"] == [3, 2]


def test_pack_dataset_truncation_counted_and_logged(caplog):
    examples = [{"input_ids": list(range(1, n + 1))} for n in (5, 30, 12, 25, 3)]
    with caplog.at_level(logging.INFO, logger="nanovision"):
        packed, stats = pack_dataset(Dataset.from_list(examples), 10)
    assert stats.examples_in == 5 and stats.truncated_examples == 3
    assert stats.truncated_tokens == 20 + 2 + 15
    assert stats.tokens == 5 + 10 + 10 + 10 + 3
    assert sum(len(row["seq_lengths"]) for row in packed) == 5  # nothing dropped
    assert sorted(n for row in packed for n in row["seq_lengths"]) == [3, 5, 10, 10, 10]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "nanovision"]
    assert len(warnings) == 1 and "truncated 3 of 5 examples" in warnings[0].getMessage()
    assert "37 tokens" in warnings[0].getMessage()
    assert any("packed 5 examples into" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)


def test_pack_dataset_keeps_images_aligned():
    """Integer stand-ins for images: image j of example e is 1000 * e + j, with 2 tokens per image."""
    rng = np.random.default_rng(4)
    examples = []
    for e in range(40):
        ids, images = [100 + e], []
        for j in range(int(rng.integers(0, 4))):
            ids += rng.integers(10, 90, size=int(rng.integers(0, 5))).tolist() + [START, IMG, IMG, END]
            images.append(1000 * e + j)
        examples.append({"input_ids": ids, "images": images, "num_images": len(images)})
    packed, stats = pack_dataset(Dataset.from_list(examples), 32, image_token_id=IMG, image_start_token_id=START,
                                 image_end_token_id=END)
    assert stats.truncated_examples == 0
    total = 0
    for row in packed:
        expected = []
        for doc in split_documents(row):
            e = doc["input_ids"][0] - 100
            expected += [1000 * e + j for j in range(doc["input_ids"].count(IMG) // 2)]
        assert row["images"] == expected
        assert row["num_images"] == len(expected)
        total += len(expected)
    assert total == sum(len(e["images"]) for e in examples)


@pytest.mark.parametrize("markers", [True, False])
def test_truncation_never_splits_an_image(markers):
    image = [START, IMG, IMG, IMG, END] if markers else [IMG, IMG, IMG]
    kw = {"image_start_token_id": START, "image_end_token_id": END} if markers else {}
    ids = [1, 2] + image + [3] + image + [4, 5]
    second = 2 + len(image) + 1  # where the second image (with its start marker) begins
    dataset = Dataset.from_list([{"input_ids": ids, "images": [10, 11]}, {"input_ids": [9] * 4, "images": []}])
    for max_length in range(second + 1, second + len(image)):  # every cut inside the second image
        packed, stats = pack_dataset(dataset, max_length, image_token_id=IMG, log_stats=False, **kw)
        row = next(r for r in packed if r["input_ids"][0] == 1)
        assert row["input_ids"][: row["seq_lengths"][0]] == ids[:second]
        assert stats.truncated_images == 1 and stats.truncated_tokens == len(ids) - second
        assert row["images"][:1] == [10] and 11 not in row["images"]
    # a cut right after the second image keeps it
    packed, stats = pack_dataset(dataset, second + len(image), image_token_id=IMG, log_stats=False, **kw)
    assert stats.truncated_images == 0 and sorted(i for r in packed for i in r["images"]) == [10, 11]


def test_truncation_splits_adjacent_images_by_count():
    # two images back to back without markers: 2 images, 6 image tokens -> 3 tokens each
    ids = [1, IMG, IMG, IMG, IMG, IMG, IMG, 2]
    dataset = Dataset.from_list([{"input_ids": ids, "images": [10, 11]}])
    packed, stats = pack_dataset(dataset, 6, image_token_id=IMG, log_stats=False)
    assert packed[0]["input_ids"] == [1, IMG, IMG, IMG] and packed[0]["images"] == [10]
    assert stats.truncated_images == 1
    packed, _ = pack_dataset(dataset, 6, image_token_id=IMG, num_image_tokens=3, log_stats=False)
    assert packed[0]["images"] == [10]


def test_truncation_errors_are_clear():
    with_images = Dataset.from_list([{"input_ids": [1, IMG, IMG, 2, 3], "images": [10]}])
    with pytest.raises(ValueError, match="image_token_id"):
        pack_dataset(with_images, 3)
    starts_with_image = Dataset.from_list([{"input_ids": [IMG, IMG, IMG, 2], "images": [10]}])
    with pytest.raises(ValueError, match="empty"):
        pack_dataset(starts_with_image, 2, image_token_id=IMG)
    with pytest.raises(ValueError, match="one label per input_id"):
        pack_dataset(Dataset.from_list([{"input_ids": [1, 2, 3], "labels": [1, 2]}]), 8)
    padded = Dataset.from_list([{"input_ids": [1, 2, 0], "attention_mask": [1, 1, 0]}])
    with pytest.raises(ValueError, match="padded"):
        pack_dataset(padded, 8)


def test_pack_dataset_beyond_a_list_columns_items_uses_large_lists(monkeypatch):
    from nanovision.training import dataset_packing

    examples = make_examples(20)
    small, _ = pack_dataset(Dataset.from_list(examples), 64, log_stats=False)
    monkeypatch.setattr(dataset_packing, "LIST_ITEMS_LIMIT", 10)
    large, _ = pack_dataset(Dataset.from_list(examples), 64, log_stats=False)
    assert type(large.features["input_ids"]).__name__ == "LargeList"
    assert type(large.features["position_ids"]).__name__ == "LargeList"
    assert large.to_list() == small.to_list()


@pytest.fixture(scope="module")
def stage_examples():
    """Each stage's built-in data, tokenized as the stage tokenizes it (4 image tokens per image)."""
    from nanovision.processing_nanovision import NanoVisionImageProcessor, NanoVisionProcessor
    from nanovision.tokenizer import train_tokenizer
    from nanovision.training.data import builtin_dataset, tokenize_for_stage

    tokenizer = train_tokenizer(builtin_dataset("base", 200, 1, 16)["train"]["text"], vocab_size=400)
    processor = NanoVisionProcessor(NanoVisionImageProcessor(size={"height": 16, "width": 16}), tokenizer,
                                    num_image_tokens=4)
    image_ids = dict(image_token_id=processor.image_token_id, num_image_tokens=4,
                     image_start_token_id=processor.image_start_token_id,
                     image_end_token_id=processor.image_end_token_id)
    examples = {}
    for stage in ("base", "vision", "sft"):
        raw = builtin_dataset(stage, 24, 1, 16, turns=3)["train"]
        examples[stage] = (tokenize_for_stage(raw, stage, tokenizer, processor), {} if stage == "base" else image_ids)
    return examples


@pytest.mark.parametrize("stage", ["base", "vision", "sft"])
def test_each_stage_truncates_over_long_examples_safely_or_refuses_them(stage, stage_examples, caplog):
    """At the shortest max_length that keeps a labelled token of every example, the long ones are cut (never inside
    an image) and counted; one token less and the example that would keep nothing to learn is refused by row."""
    tokenized, image_ids = stage_examples[stage]
    first_targets = [next(t for t, label in enumerate(labels) if t and label != -100)
                     for labels in tokenized["labels"]]
    limit = max(first_targets) + 1
    assert limit < max(len(ids) for ids in tokenized["input_ids"])
    with caplog.at_level(logging.WARNING, logger="nanovision"):
        packed, stats = pack_dataset(tokenized, limit, **image_ids)
    assert stats.truncated_examples > 0 and f"to max_length={limit}" in caplog.text
    for row in packed:
        assert len(row["input_ids"]) <= limit
        if image_ids:  # whole images only, each with its markers
            ids = np.array(row["input_ids"])
            assert (ids == image_ids["image_token_id"]).sum() == 4 * len(row["images"])
            assert (ids == image_ids["image_start_token_id"]).sum() == len(row["images"])
            assert (ids == image_ids["image_end_token_id"]).sum() == len(row["images"])
    row = first_targets.index(limit - 1)
    length = len(tokenized[row]["input_ids"])
    refused = (rf"example {row} has {length} tokens, more than max_length={limit - 1}.*labelled token is at position "
               rf"{limit - 1}.*--pack_max_length\) to at least {limit}")
    with pytest.raises(ValueError, match=refused):
        pack_dataset(tokenized, limit - 1, **image_ids)


def test_empty_dataset_and_empty_batch_are_refused():
    empty = Dataset.from_dict({"input_ids": [], "labels": []})
    with pytest.raises(ValueError, match=r"empty dataset \(0 examples\).*--dataset"):
        pack_dataset(empty, 8)
    with pytest.raises(ValueError, match="empty batch"):
        PackedDataCollator()([])


# ---------------------------------------------------------------------------------------------- collator


def fake_image_processor(images, return_tensors=None):
    """Image stand-in n becomes a [3, 2, 2] tensor filled with n."""
    assert return_tensors == "pt"
    return {"pixel_values": torch.tensor(images, dtype=torch.float32)[:, None, None, None].expand(-1, 3, 2, 2)}


def test_collator_pads_packed_rows():
    rows = [
        {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, 7, -100, 9], "position_ids": [0, 1, 2, 0, 1]},
        {"input_ids": [1, 2], "labels": [1, 2], "seq_lengths": [2]},  # labels[0] fixed to -100, positions derived
    ]
    batch = PackedDataCollator(pad_token_id=0, pad_to_multiple_of=4)(rows)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert all(t.dtype == torch.long and t.shape == (2, 8) for t in batch.values())
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0, 0], [1, 2, 0, 0, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9, -100, -100, -100], [-100, 2] + [-100] * 6]
    # padding is one more document: positions restart at 0 and continue
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 0, 1, 2, 3, 4, 5]]
    batch = PackedDataCollator(return_attention_mask=True)(rows)
    assert batch["input_ids"].shape == (2, 5)
    assert batch["attention_mask"].tolist() == [[1] * 5, [1, 1, 0, 0, 0]]
    with pytest.raises(ValueError, match="max_length=4"):
        PackedDataCollator(max_length=4)(rows)


def test_collator_pixel_values_in_row_major_order():
    rows = [
        {"input_ids": [1, 2, 3], "position_ids": [0, 1, 0], "images": [30, 31]},
        {"input_ids": [4], "position_ids": [0], "images": []},
        {"input_ids": [5, 6], "position_ids": [0, 1], "images": [50]},
    ]
    batch = PackedDataCollator(image_processor=fake_image_processor)(rows)
    assert batch["pixel_values"].shape == (3, 3, 2, 2)
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [30, 31, 50]
    # already-processed pixel_values travel the same way
    processed = [dict(r, images=None, pixel_values=fake_image_processor(r["images"], "pt")["pixel_values"])
                 for r in rows if r["images"]]
    batch = PackedDataCollator()(processed)
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [30, 31, 50]
    with pytest.raises(ValueError, match="image_processor"):
        PackedDataCollator()(rows)
    with pytest.raises(ValueError, match="num_images=3"):
        PackedDataCollator(image_processor=fake_image_processor)([dict(rows[0], num_images=3)])


def test_collator_packs_on_the_fly():
    examples = [dict(e, images=[e["input_ids"][0]] * (i % 3)) for i, e in enumerate(make_examples(30, seed=5))]
    collator = PackedDataCollator(pack_on_the_fly=True, max_length=48, image_processor=fake_image_processor)
    batch = collator(examples)
    assert batch["input_ids"].shape[0] < len(examples) and batch["input_ids"].shape[1] <= 48
    found, images = [], []
    for ids, labels, positions in zip(*(batch[k].tolist() for k in ("input_ids", "labels", "position_ids"))):
        starts = [t for t, p in enumerate(positions) if p == 0]
        for start, stop in zip(starts, starts[1:] + [len(ids)]):
            if ids[start] < 100:  # padding document
                assert set(ids[start:stop]) == {0} and set(labels[start:stop]) == {-100}
                continue
            e = ids[start] - 100
            found.append(e)
            images += [ids[start]] * (e % 3)
            assert ids[start:stop] == examples[e]["input_ids"]
            assert labels[start:stop] == [-100] + examples[e]["labels"][1:]
    assert sorted(found) == list(range(30))
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == images
    too_long = r"example 1 of the batch has 60 tokens, more than max_length=48.*pack_dataset"
    with pytest.raises(ValueError, match=too_long):
        collator([{"input_ids": [1] * 10}, {"input_ids": [1] * 60}])
    with pytest.raises(ValueError, match="max_length"):
        PackedDataCollator(pack_on_the_fly=True)


# ---------------------------------------------------------------------------------------------- model equivalence


def tiny_lm(attn):
    from nanovision import NanoVisionForCausalLM

    model = randomize(NanoVisionForCausalLM(tiny_text_config()))
    model.set_attn_implementation(attn)
    return model.train()


def packed_batch(examples, mode, max_length=64, **collator_kw):
    if mode == "pre":
        pack_kw = collator_kw.pop("pack", {})
        packed, _ = pack_dataset(Dataset.from_list(examples), max_length, log_stats=False, **pack_kw)
        return PackedDataCollator(**collator_kw)(list(packed))
    return PackedDataCollator(pack_on_the_fly=True, max_length=max_length, **collator_kw)(examples)


def lm_examples(n=9, seed=6):
    examples = make_examples(n, seed=seed)
    for index, e in enumerate(examples):
        e["input_ids"][0] = 1 + e["input_ids"][0] % 90  # make_examples' 100 + index is beyond the tiny vocabulary
        if index % 2 or e["labels"][0] != -100:  # no prompt: a label at the document start that packing must drop
            e["labels"] = list(e["input_ids"])
    return examples


def num_targets(examples):
    return sum(int((torch.tensor(e["labels"][1:]) != -100).sum()) for e in examples)


@pytest.mark.parametrize("mode", ["pre", "fly"])
@pytest.mark.parametrize("attn", ["eager", "sdpa", "nanovision_varlen"])
def test_packed_loss_and_grads_equal_unpacked(attn, mode):
    examples = lm_examples()
    total = num_targets(examples)
    model = tiny_lm(attn)
    # the flash-attention kwargs ride along harmlessly for other backends
    batch = packed_batch(examples, mode, pad_token_id=3, return_flash_attn_kwargs=mode == "fly")
    assert batch["input_ids"].shape[0] > 1 and (batch["labels"] == -100).any()  # several rows, padding
    packed_loss = model(**batch).loss  # mean over the batch's targets
    model(**batch, num_items_in_batch=torch.tensor(total)).loss.backward()  # as HF Trainer calls it
    packed_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    unpacked_loss = 0.0
    for e in examples:
        out = model(torch.tensor([e["input_ids"]]), labels=torch.tensor([e["labels"]]),
                    num_items_in_batch=torch.tensor(total))
        out.loss.backward()
        unpacked_loss += out.loss.detach()
    torch.testing.assert_close(packed_loss.detach(), unpacked_loss, atol=1e-5, rtol=1e-5)
    for packed_grad, param in zip(packed_grads, model.parameters()):
        torch.testing.assert_close(packed_grad, param.grad, atol=1e-5, rtol=1e-4)


def test_packed_loss_equals_unpacked_flex_attention_forward():
    """The documents alone run on sdpa: torch 2.13's compiled flex_attention on the CPU returns NaN for a single
    8-token sequence (seen with a stock transformers Llama too), and one of these documents is that long."""
    examples = lm_examples(5, seed=7)  # flex_attention compiles once per shape: few examples
    total = num_targets(examples)
    model = tiny_lm("flex_attention")
    with torch.no_grad():
        packed_loss = model(**packed_batch(examples, "pre")).loss
        model.set_attn_implementation("sdpa")
        unpacked = sum(
            model(torch.tensor([e["input_ids"]]), labels=torch.tensor([e["labels"]]),
                  num_items_in_batch=torch.tensor(total)).loss
            for e in examples
        )
    torch.testing.assert_close(packed_loss, unpacked, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "nanovision_varlen"])
def test_packed_vlm_loss_and_grads_equal_unpacked(attn):
    """pixel_values follow the placeholders in row-major order: a wrong order would change the loss. The unpacked
    reference runs on sdpa: with nanovision_varlen the vision tower must stay bidirectional."""
    from nanovision import NanoVisionForConditionalGeneration

    config = tiny_vlm_config()
    per_image = config.num_image_tokens
    model = randomize(NanoVisionForConditionalGeneration(config), std=0.1).train()
    model.set_attn_implementation(attn)
    pixels = torch.randn(40, 3, 32, 32, generator=torch.Generator().manual_seed(8))

    def processor(images, return_tensors=None):
        return {"pixel_values": pixels[torch.tensor(images)]}

    rng = np.random.default_rng(9)
    examples = []
    for e in range(7):
        ids, images = [], []
        for _ in range(int(rng.integers(0, 3))):
            ids += rng.integers(10, 90, size=int(rng.integers(1, 4))).tolist() + [START] + [IMG] * per_image + [END]
            images.append(len(examples) * 3 + len(images))
        ids += rng.integers(10, 90, size=int(rng.integers(2, 8))).tolist()
        examples.append({"input_ids": ids, "labels": [-100 if t == IMG else t for t in ids], "images": images})
    assert sum(len(e["images"]) for e in examples) >= 4
    total = num_targets(examples)
    batch = packed_batch(examples, "pre", max_length=40, image_processor=processor,
                         pack={"image_token_id": IMG, "image_start_token_id": START, "image_end_token_id": END})
    assert batch["input_ids"].shape[0] > 1
    model(**batch, num_items_in_batch=torch.tensor(total)).loss.backward()
    packed_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_attn_implementation("sdpa")
    for e in examples:
        pixel_values = processor(e["images"])["pixel_values"] if e["images"] else None
        model(torch.tensor([e["input_ids"]]), labels=torch.tensor([e["labels"]]), pixel_values=pixel_values,
              num_items_in_batch=torch.tensor(total)).loss.backward()
    for (name, param), packed_grad in zip(model.named_parameters(), packed_grads):
        torch.testing.assert_close(packed_grad, param.grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_collator_works_as_trainer_data_collator(tmp_path):
    from transformers import Trainer, TrainingArguments

    packed, _ = pack_dataset(Dataset.from_list(lm_examples(12, seed=10)), 48, log_stats=False)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, report_to=[],
                             remove_unused_columns=False, use_cpu=True, save_strategy="no", logging_steps=1)
    trainer = Trainer(model=tiny_lm("sdpa"), args=args, train_dataset=packed, data_collator=PackedDataCollator())
    result = trainer.train()
    assert np.isfinite(result.training_loss)


def emulated_flash_attention(monkeypatch):
    """transformers' flash-attention path (mask handling, varlen dispatch) over a PyTorch stand-in for the kernels,
    so that the CPU can check what flash_attention_2 receives."""
    import torch.nn.functional as F
    import transformers.modeling_flash_attention_utils as fa_utils

    def flash_fn(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):  # [B, T, H, D]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=causal, scale=softmax_scale, enable_gqa=True)
        return out.transpose(1, 2)

    def varlen_fn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                  softmax_scale=None, causal=False):  # [total, H, D]
        bounds = cu_seqlens_q.tolist()
        return torch.cat([flash_fn(q[None, a:b], k[None, a:b], v[None, a:b], dropout_p, softmax_scale, causal)[0]
                          for a, b in itertools.pairwise(bounds)])

    functions = ((flash_fn, varlen_fn, None, fa_utils._pad_input, fa_utils._unpad_input),
                 (fa_utils._lazy_define_process_function(varlen_fn), dict))
    monkeypatch.setattr(fa_utils, "lazy_import_flash_attention", lambda *args, **kwargs: functions)


def test_flash_attention_with_several_rows_uses_the_collators_cu_seqlens(monkeypatch):
    """transformers finds cu_seqlens in position_ids only for a single row; return_flash_attn_kwargs covers B > 1."""
    emulated_flash_attention(monkeypatch)
    examples = lm_examples(seed=11)
    total = num_targets(examples)
    model = tiny_lm("sdpa")
    model.config._attn_implementation = "flash_attention_2"  # the kernels are emulated: skip the install check
    batch = packed_batch(examples, "fly", pad_token_id=3, return_flash_attn_kwargs=True)
    assert batch["input_ids"].shape[0] > 1
    bounds = batch["cu_seq_lens_q"].tolist()
    assert bounds[0] == 0 and bounds[-1] == batch["input_ids"].numel() and batch["max_length_q"] <= 64
    assert bounds[:-1] == torch.nonzero(batch["position_ids"].reshape(-1) == 0).flatten().tolist()
    model(**batch, num_items_in_batch=torch.tensor(total)).loss.backward()
    packed_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for e in examples:
        model(torch.tensor([e["input_ids"]]), labels=torch.tensor([e["labels"]]),
              num_items_in_batch=torch.tensor(total)).loss.backward()
    for packed_grad, param in zip(packed_grads, model.parameters()):
        torch.testing.assert_close(packed_grad, param.grad, atol=1e-5, rtol=1e-4)


def packed_lm(attn, monkeypatch):
    """A tiny LM on `attn`; flash attention emulated on the CPU."""
    if attn.startswith("flash"):
        emulated_flash_attention(monkeypatch)
        model = tiny_lm("sdpa")
        model.config._attn_implementation = attn  # the kernels are emulated: skip the install check
        return model
    return tiny_lm(attn)


def test_flash_attention_refuses_packed_rows_it_would_attend_across(monkeypatch):
    """Without cu_seq_lens, transformers' flash path reads documents off position_ids for one row only (from its
    smallest position): several packed rows, or one whose first document does not start at 0, would attend across
    documents or drop tokens."""
    model = packed_lm("flash_attention_2", monkeypatch)
    batch = packed_batch(lm_examples(seed=11), "fly", pad_token_id=3)
    assert batch["input_ids"].shape[0] > 1
    with pytest.raises(ValueError, match="return_flash_attn_kwargs"):
        model(**batch)
    row = dict(input_ids=batch["input_ids"][:1, :12], position_ids=torch.tensor([[3, 4, 5, 6, 0, 1, 2, 3, 0, 1, 2, 3]]))
    with pytest.raises(ValueError, match="one row starting at position 0"):
        model(**row)
    row["position_ids"] = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 1, 2]])  # one row, packed: transformers' case
    model(**row)
    rows = dict(input_ids=batch["input_ids"][:, :8],
                position_ids=torch.arange(5, 13).expand(len(batch["input_ids"]), 8))
    model(**rows)  # several rows of one document each (a continuation may start past 0)


@pytest.mark.parametrize("attn", ["eager", "sdpa", "nanovision_varlen", "flash_attention_2"])
def test_position_ids_that_jump_inside_a_row_are_refused(attn, monkeypatch):
    """sdpa would start a document at the jump, nanovision_varlen only at a restart to 0: the row means different
    documents to different backends."""
    model = packed_lm(attn, monkeypatch)
    ids = torch.arange(8)[None] + 5
    with pytest.raises(ValueError, match="position_ids jump inside a row"):
        model(input_ids=ids, position_ids=torch.tensor([[0, 1, 2, 6, 7, 0, 1, 2]]))
    model(input_ids=ids, position_ids=torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2]]))


def test_an_engines_own_attention_gets_its_flattened_sequences_unchecked():
    """A serving engine (vLLM's Transformers backend) registers its own attention and flattens its sequences into
    one row, each at its own position: positions that jump are its layout, not a packing mistake."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("engine_attention", sdpa_attention_forward)
    AttentionMaskInterface.register("engine_attention", sdpa_mask)
    model = tiny_lm("sdpa")
    model.config._attn_implementation = "engine_attention"
    model(input_ids=torch.arange(4)[None] + 5, position_ids=torch.tensor([[37, 12, 50, 3]]))


def corrupt_bounds(batch, case):
    bounds = batch["cu_seq_lens_q"]
    if case == "a document split in two":
        bounds = torch.cat([bounds[:1], bounds[:2].sum(0, keepdim=True) // 2, bounds[1:]])
    elif case == "two documents merged":
        bounds = torch.cat([bounds[:1], bounds[2:]])
    elif case == "fewer tokens than the batch":
        bounds = torch.cat([bounds[:-1], bounds[-1:] - 1])
    elif case == "max_length_q short":
        return {**batch, "max_length_q": batch["max_length_q"] - 1}
    elif case == "cu_seq_lens_k differs":
        return {**batch, "cu_seq_lens_k": torch.cat([bounds[:1], bounds[2:], bounds[-1:]])}
    elif case == "max_length_k missing":
        return {k: v for k, v in batch.items() if k != "max_length_k"}
    elif case == "float bounds":
        bounds = bounds.float()
    return {**batch, "cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds}


@pytest.mark.parametrize("case", ["a document split in two", "two documents merged", "fewer tokens than the batch",
                                  "max_length_q short", "cu_seq_lens_k differs", "max_length_k missing",
                                  "float bounds"])
@pytest.mark.parametrize("attn", ["nanovision_varlen", "flash_attention_2"])
def test_cu_seqlens_that_disagree_with_position_ids_are_refused(attn, case, monkeypatch):
    """The collator's kwargs pass; bounds that split, merge or miss position_ids' documents (or a max_length that
    would leave tokens uncomputed) raise instead of attending to the wrong tokens."""
    model = packed_lm(attn, monkeypatch)
    batch = packed_batch(lm_examples(seed=11), "fly", pad_token_id=3, return_flash_attn_kwargs=True)
    model(**batch)
    with pytest.raises(ValueError, match="cu_seq_lens|max_length"):
        model(**corrupt_bounds(batch, case))


def test_checks_queued_on_an_accelerator_pass_a_message_cuda_accepts(monkeypatch):
    """CUDA's torch._assert_async raises for a message of 255 characters or more, even where the condition holds (on
    the H100 every eager packed batch with the flash kwargs failed on check_packed_rows' message). What is queued is
    the message's start, which names the field."""
    from unittest import mock

    from nanovision.modeling_nanovision import check_values

    def cuda_assert_async(condition, message):
        if len(message) >= 255:
            raise RuntimeError("Message length must be smaller than 255")
        queued.append(message)

    queued = []
    monkeypatch.setattr(torch, "_assert_async", cuda_assert_async)
    message = "cu_seq_lens_q / max_length_q do not describe the documents of position_ids; " * 5
    check_values(mock.Mock(device=torch.device("cuda")), message)
    assert queued == [message[:254]]

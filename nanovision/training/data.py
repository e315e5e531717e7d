"""Datasets for the three training stages: loading, column checks, and tokenization into examples
`{"input_ids", "labels", "images"}` that `pack_dataset` packs.

Conventional columns:
- base:   `text`
- vision: `image`, `caption` (image-caption pairs)
- sft:    `messages` (HF messages convention, `{"type": "image"}` / `{"type": "text"}` parts) and `images`
"""

import os

import datasets

from ..data import shapes
from ..modeling_nanovision import IGNORE_INDEX

STAGE_COLUMNS = {"base": ("text",), "vision": ("image", "caption"), "sft": ("messages", "images")}


def require_columns(dataset: datasets.Dataset, stage: str) -> None:
    missing = [column for column in STAGE_COLUMNS[stage] if column not in dataset.column_names]
    if missing:
        raise ValueError(
            f"The {stage} stage expects columns {list(STAGE_COLUMNS[stage])}, but the dataset lacks {missing} "
            f"(it has {dataset.column_names}). Rename them with dataset.rename_column(...)."
        )


def builtin_dataset(stage: str, num_train: int, num_test: int, image_size: int, seed: int = 0,
                    turns: int = 1, caption_turn: bool = False) -> datasets.DatasetDict:
    if stage == "base":
        return shapes.text_dataset(num_train=num_train, num_test=num_test, seed=seed)
    if stage == "vision":
        return shapes.caption_dataset(num_train=num_train, num_test=num_test, image_size=image_size, seed=seed)
    return shapes.qa_dataset(num_train=num_train, num_test=num_test, image_size=image_size, seed=seed,
                             train_turns=turns, caption_turn=caption_turn)


def load_stage_dataset(source: str, stage: str, split: str = "train") -> datasets.Dataset:
    """Open anything `datasets.load_dataset` opens: a Hub name, a local dataset folder, or parquet/json(l)/csv
    files; a folder written by `save_to_disk` also works."""
    if os.path.isdir(source) and os.path.exists(os.path.join(source, "dataset_dict.json")):
        dataset = datasets.load_from_disk(source)[split]
    elif os.path.isdir(source) and os.path.exists(os.path.join(source, "dataset_info.json")):
        dataset = datasets.load_from_disk(source)
    elif os.path.isfile(source):
        builder = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}.get(
            os.path.splitext(source)[1])
        if builder is None:
            raise ValueError(f"Cannot tell the format of {source}: use a .parquet, .json, .jsonl or .csv file.")
        dataset = datasets.load_dataset(builder, data_files=source, split="train")
    else:
        dataset = datasets.load_dataset(source, split=split)
    require_columns(dataset, stage)
    return dataset


def expand_images(input_ids, labels, tokenizer, num_image_tokens):
    """Each `<image>` id becomes `<|image_start|>` + `<image>` * num_image_tokens + `<|image_end|>`, unlabelled:
    the positions the model fills with image embeddings."""
    image = tokenizer.convert_tokens_to_ids("<image>")
    block = [tokenizer.convert_tokens_to_ids("<|image_start|>"), *[image] * num_image_tokens,
             tokenizer.convert_tokens_to_ids("<|image_end|>")]
    ids, targets = [], []
    for token, label in zip(input_ids, labels):
        if token == image:
            ids += block
            targets += [IGNORE_INDEX] * len(block)
        else:
            ids.append(token)
            targets.append(label)
    return ids, targets


def tokenize_text(example, tokenizer):
    ids = [tokenizer.bos_token_id, *tokenizer(example["text"], add_special_tokens=False)["input_ids"],
           tokenizer.eos_token_id]
    return {"input_ids": ids, "labels": ids}


def tokenize_caption(example, tokenizer, num_image_tokens):
    """`<|bos|><image>caption<|end|>`; only the caption and its end token are learned."""
    caption = tokenizer(example["caption"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    prompt = [tokenizer.bos_token_id, tokenizer.convert_tokens_to_ids("<image>")]
    ids, labels = expand_images(prompt + caption, [IGNORE_INDEX] * len(prompt) + caption, tokenizer, num_image_tokens)
    return {"input_ids": ids, "labels": labels, "images": [example["image"]]}


def tokenize_conversation(example, tokenizer, num_image_tokens):
    """The chat template renders the conversation; only assistant turns (with their end token) are learned."""
    rendered = tokenizer.apply_chat_template(example["messages"], tokenize=True, return_dict=True,
                                             return_assistant_tokens_mask=True)
    ids = rendered["input_ids"]
    labels = [token if keep else IGNORE_INDEX for token, keep in zip(ids, rendered["assistant_masks"])]
    ids, labels = expand_images(ids, labels, tokenizer, num_image_tokens)
    num_placeholders = sum(part.get("type") == "image" for message in example["messages"]
                           if isinstance(message["content"], list) for part in message["content"])
    if num_placeholders != len(example["images"]):
        raise ValueError(f"A conversation has {num_placeholders} image parts but {len(example['images'])} images.")
    return {"input_ids": ids, "labels": labels, "images": list(example["images"])}


def tokenize_for_stage(dataset: datasets.Dataset, stage: str, tokenizer, num_image_tokens: int | None = None,
                       num_proc: int | None = None) -> datasets.Dataset:
    require_columns(dataset, stage)
    if stage == "base":
        function, kwargs = tokenize_text, {"tokenizer": tokenizer}
    else:
        function = tokenize_caption if stage == "vision" else tokenize_conversation
        kwargs = {"tokenizer": tokenizer, "num_image_tokens": num_image_tokens}
    return dataset.map(function, fn_kwargs=kwargs, remove_columns=dataset.column_names, num_proc=num_proc,
                       desc=f"tokenizing ({stage})")

"""Datasets for the three training stages: loading, column checks, and tokenization into examples
`{"input_ids", "labels", "images"}` that `pack_dataset` packs.

Conventional columns:
- base:   `text`
- vision: `image`, `caption` (image-caption pairs)
- sft:    `messages` (HF messages convention, `{"type": "image"}` / `{"type": "text"}` parts) and `images`
"""

import json
import os

import datasets
import pyarrow.compute as pc

from ..data import shapes
from ..modeling_nanovision import IGNORE_INDEX

STAGE_COLUMNS = {"base": ("text",), "vision": ("image", "caption"), "sft": ("messages", "images")}
STRING_TYPES = ("string", "large_string")
FILE_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}
SHOWN_ROWS = 5  # row numbers an error lists
NO_VALUES = datasets.Value("null")  # the type of a list column whose lists are all empty (text-only conversations)


def _is_string(feature) -> bool:
    return isinstance(feature, datasets.Value) and feature.dtype in STRING_TYPES


def _is_list_of(feature, item_check) -> bool:
    if isinstance(feature, datasets.List | datasets.LargeList):
        return item_check(feature.feature)
    return isinstance(feature, list) and len(feature) == 1 and item_check(feature[0])


def _is_message(feature) -> bool:
    return isinstance(feature, dict) and {"role", "content"} <= set(feature)


COLUMN_TYPES = {  # column: (check of its feature, what it must hold)
    "text": (_is_string, "a string per row"),
    "caption": (_is_string, "a string per row"),
    "image": (lambda f: isinstance(f, datasets.Image), "an image per row (datasets.Image, or an image path)"),
    "messages": (lambda f: _is_list_of(f, _is_message), "a list of {'role', 'content'} messages per row"),
    "images": (lambda f: _is_list_of(f, lambda item: isinstance(item, datasets.Image)),
               "a list of images per row (datasets.Image, or image paths)"),
}


def _rows(indices) -> str:
    shown = ", ".join(str(index) for index in indices[:SHOWN_ROWS])
    return f"row{'s' if len(indices) > 1 else ''} {shown}{', ...' if len(indices) > SHOWN_ROWS else ''}"


def require_columns(dataset: datasets.Dataset, stage: str, source: str = "the dataset") -> datasets.Dataset:
    """Check that `dataset` has the stage's columns, of the right types and without empty values; returns it with
    image paths (string columns) and image lists that are all empty cast to `datasets.Image`. Row numbers in errors
    count from 0."""
    missing = [column for column in STAGE_COLUMNS[stage] if column not in dataset.column_names]
    if missing:
        raise ValueError(
            f"The {stage} stage expects columns {list(STAGE_COLUMNS[stage])}, but {source} lacks {missing} "
            f"(it has {dataset.column_names}). Rename them with dataset.rename_column(...)."
        )
    for column in STAGE_COLUMNS[stage]:
        feature = dataset.features[column]
        if column == "image" and _is_string(feature):
            dataset = dataset.cast_column(column, datasets.Image())
        elif column == "images" and _is_list_of(feature, lambda item: _is_string(item) or item == NO_VALUES):
            dataset = dataset.cast_column(column, datasets.List(datasets.Image()))
        check, expected = COLUMN_TYPES[column]
        if not check(dataset.features[column]):
            raise ValueError(f"Column '{column}' of {source} holds {dataset.features[column]}; the {stage} stage needs "
                             f"{expected}.")
    table = dataset.select_columns(list(STAGE_COLUMNS[stage])).with_format("arrow")[:]  # no image decoding
    for column in STAGE_COLUMNS[stage]:
        empty = pc.is_null(table.column(column))
        if column == "caption":
            empty = pc.or_(empty, pc.equal(pc.utf8_length(table.column(column)), 0))
        rows = pc.indices_nonzero(empty).to_pylist()
        if rows:
            raise ValueError(f"{len(rows)} of {len(table)} rows of {source} have no '{column}' ({_rows(rows)}): fill "
                             "them in or drop them (dataset.filter(...)).")
    if stage == "sft":
        _check_conversations(dataset, pc.list_value_length(table.column("images")).to_pylist(), source)
    return dataset


def _check_conversations(dataset: datasets.Dataset, num_images: list[int], source: str) -> None:
    """Each conversation needs an assistant turn (SFT learns from assistant turns only: a batch without one has no
    loss) and one image per image part."""
    without_answer, image_mismatch, unknown_roles = [], [], []
    conversations = (messages for batch in dataset.select_columns(["messages"]).iter(batch_size=1024)
                     for messages in batch["messages"])
    for index, messages in enumerate(conversations):
        roles = [message.get("role") for message in messages or []]
        if "assistant" not in roles:
            without_answer.append(index)
        if set(roles) - {"system", "user", "assistant"}:
            unknown_roles.append(index)
        parts = sum(part.get("type") == "image" for message in messages or []
                    if isinstance(message.get("content"), list) for part in message["content"] if part)
        if parts != num_images[index]:
            image_mismatch.append(index)
    total = len(num_images)
    if without_answer:
        raise ValueError(f"{len(without_answer)} of {total} conversations in {source} have no assistant turn "
                         f"({_rows(without_answer)}): SFT learns from the assistant's replies only. Add the reply or "
                         "drop those rows.")
    if unknown_roles:
        raise ValueError(f"{len(unknown_roles)} of {total} conversations in {source} have a role other than system, "
                         f"user or assistant ({_rows(unknown_roles)}).")
    if image_mismatch:
        raise ValueError(f"{len(image_mismatch)} of {total} conversations in {source} have a number of "
                         f"{{'type': 'image'}} parts other than their number of images ({_rows(image_mismatch)}): "
                         "each image part stands for the next image of the row's `images`.")


def builtin_dataset(stage: str, num_train: int, num_test: int, image_size: int, seed: int = 0,
                    turns: int = 1, caption_turn: bool = False) -> datasets.DatasetDict:
    if stage == "base":
        return shapes.text_dataset(num_train=num_train, num_test=num_test, seed=seed)
    if stage == "vision":
        return shapes.caption_dataset(num_train=num_train, num_test=num_test, image_size=image_size, seed=seed)
    return shapes.qa_dataset(num_train=num_train, num_test=num_test, image_size=image_size, seed=seed,
                             train_turns=turns, caption_turn=caption_turn)


def count_json_rows(path: str) -> int:
    """The rows of a .json/.jsonl file, checked first to name the file and line of a malformed JSON line (datasets'
    own error names neither) and to catch an empty file (datasets fails on it with a bare StopIteration). A .json
    file may be one JSON document or JSON lines."""
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as file:
            try:
                document = json.load(file)
                return len(document) if isinstance(document, list) else 1
            except json.JSONDecodeError:
                pass  # JSON lines, or malformed: the line by line check tells
    rows = 0
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {number}: not valid JSON ({error.msg}, column {error.colno}). Each "
                                 "line holds one JSON object: a row of the dataset.") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}, line {number}: a JSON {type(row).__name__}, not an object; each line holds "
                                 "one row as a JSON object of column values.")
            rows += 1
    return rows


def load_stage_dataset(source: str, stage: str, split: str = "train") -> datasets.Dataset:
    """Open anything `datasets.load_dataset` opens: a Hub name, a local dataset folder, or parquet/json(l)/csv
    files; a folder written by `save_to_disk` also works. Checks the data for the stage (`require_columns`): it has
    rows, the stage's columns, and for sft an assistant turn in every conversation."""
    if os.path.isdir(source) and os.path.exists(os.path.join(source, "dataset_dict.json")):
        splits = datasets.load_from_disk(source)
        if split not in splits:
            raise ValueError(f"{source} has no split {split!r} (it has {list(splits)}): pass --dataset_split.")
        dataset = splits[split]
    elif os.path.isdir(source) and os.path.exists(os.path.join(source, "dataset_info.json")):
        dataset = datasets.load_from_disk(source)
    elif os.path.isfile(source):
        builder = FILE_BUILDERS.get(os.path.splitext(source)[1])
        if builder is None:
            raise ValueError(f"Cannot tell the format of {source}: use a .parquet, .json, .jsonl or .csv file.")
        empty = builder == "json" and count_json_rows(source) == 0
        dataset = None if empty else datasets.load_dataset(builder, data_files=source, split="train")
    else:
        dataset = datasets.load_dataset(source, split=split)
    if dataset is None or len(dataset) == 0:
        raise ValueError(f"{source} (split {split!r}) has no rows: the {stage} stage needs at least one example.")
    return require_columns(dataset, stage, source)


def expand_images(input_ids, labels, processor):
    """Each image placeholder id becomes the ids of the processor's own expansion (`replace_image_token`:
    `<|image_start|>` + `<image>` * num_image_tokens + `<|image_end|>`), unlabelled: the positions the model fills
    with image embeddings."""
    block = processor.tokenizer.encode(processor.replace_image_token(), add_special_tokens=False)
    ids, targets = [], []
    for token, label in zip(input_ids, labels):
        if token == processor.image_token_id:
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


def tokenize_caption(example, processor):
    """`<|bos|><image>caption<|end|>`; only the caption and its end token are learned."""
    tokenizer = processor.tokenizer
    caption = tokenizer(example["caption"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    prompt = [tokenizer.bos_token_id, processor.image_token_id]
    ids, labels = expand_images(prompt + caption, [IGNORE_INDEX] * len(prompt) + caption, processor)
    return {"input_ids": ids, "labels": labels, "images": [example["image"]]}


def tokenize_conversation(example, processor):
    """The chat template renders the conversation; only assistant turns (with their end token) are learned."""
    rendered = processor.tokenizer.apply_chat_template(example["messages"], tokenize=True, return_dict=True,
                                                       return_assistant_tokens_mask=True)
    ids = rendered["input_ids"]
    labels = [token if keep else IGNORE_INDEX for token, keep in zip(ids, rendered["assistant_masks"])]
    ids, labels = expand_images(ids, labels, processor)
    num_placeholders = sum(part.get("type") == "image" for message in example["messages"]
                           if isinstance(message["content"], list) for part in message["content"])
    if num_placeholders != len(example["images"]):
        raise ValueError(f"A conversation has {num_placeholders} image parts but {len(example['images'])} images.")
    return {"input_ids": ids, "labels": labels, "images": list(example["images"])}


def tokenize_for_stage(dataset: datasets.Dataset, stage: str, tokenizer, processor=None,
                       num_proc: int | None = None) -> datasets.Dataset:
    """`processor` (a NanoVisionProcessor, whose tokenizer is used) is needed by the vision and sft stages."""
    dataset = require_columns(dataset, stage)
    if stage == "base":
        function, kwargs = tokenize_text, {"tokenizer": tokenizer}
    else:
        function = tokenize_caption if stage == "vision" else tokenize_conversation
        if processor is None:
            raise ValueError(f"tokenize_for_stage: the {stage} stage needs the processor, which expands its images")
        kwargs = {"processor": processor}
    return dataset.map(function, fn_kwargs=kwargs, remove_columns=dataset.column_names, num_proc=num_proc,
                       desc=f"tokenizing ({stage})")

"""`PackedDataCollator`: batches packed rows (from `pack_dataset`), or packs a batch of examples on the fly, into
the ``input_ids`` / ``labels`` / ``position_ids`` tensors that transformers trains on without an attention mask.

With HF ``Trainer`` pass ``remove_unused_columns=False`` in ``TrainingArguments``: otherwise Trainer removes the
columns the model's ``forward`` does not name (``images``, ``seq_lengths``, ``num_images``) before the collator sees
them. Trainer counts ``num_items_in_batch`` from ``labels[..., 1:] != IGNORE_INDEX``, which the IGNORE_INDEX at
document starts makes equal to the unpacked count.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..kernels import document_bounds
from ..modeling_nanovision import IGNORE_INDEX
from .bin_packing import first_fit_decreasing



def _as_int_array(values, what: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy().astype(np.int64, copy=False).reshape(-1)
    array = np.asarray(values, dtype=np.int64)
    if array.ndim != 1:
        raise ValueError(f"{what} must be a flat list of ints, got shape {array.shape}")
    return array


def _as_pixel_tensor(values) -> torch.Tensor | None:
    if values is None:
        return None
    if isinstance(values, torch.Tensor):
        tensor = values
    elif isinstance(values, (list, tuple)) and values and all(isinstance(v, torch.Tensor) for v in values):
        tensor = torch.stack(list(values))
    else:
        if isinstance(values, (list, tuple)) and not values:
            return None
        tensor = torch.as_tensor(np.asarray(values, dtype=np.float32))
    if tensor.ndim == 3:  # one image [3, H, W]
        tensor = tensor.unsqueeze(0)
    return tensor if tensor.shape[0] else None


@dataclass
class _Row:
    input_ids: np.ndarray
    labels: np.ndarray
    position_ids: np.ndarray
    images: list = field(default_factory=list)  # raw images for the image_processor
    pixel_values: list = field(default_factory=list)  # already processed tensors [n, 3, H, W]


@dataclass
class PackedDataCollator:
    """Batch packed rows (or pack examples on the fly) into ``input_ids``, ``labels``, ``position_ids`` tensors.

    Modes:

    * default: each feature is a row from `pack_dataset` (``input_ids``, ``labels``, ``position_ids``; a row with no
      ``position_ids`` gets them from ``seq_lengths``, or is one document). Rows are padded to the longest row of the
      batch (rounded up to ``pad_to_multiple_of``); ``max_length``, when set, is checked.
    * ``pack_on_the_fly=True``: each feature is one tokenized example (``input_ids``, optional ``labels``, images);
      the batch's examples are packed first-fit decreasing into rows of ``max_length`` (required), so the number of
      rows varies per batch. An example longer than ``max_length`` raises ValueError: truncate with `pack_dataset`.

    Padding: ``pad_token_id`` with label IGNORE_INDEX and position ids 0, 1, ... after the row's last document,
    i.e. one more document: transformers' packed-sequence mask keeps it block-diagonal, padding tokens attend only to
    each other and never to (or from) real tokens, and add nothing to the loss. The first token of every document
    (every position id 0) gets label IGNORE_INDEX, whatever the feature says: the model shifts labels, so that label
    would make the previous document's last token predict the next document.

    Images: a feature's ``images`` (raw, processed here by ``image_processor(images, return_tensors="pt")
    ["pixel_values"]``, e.g. a ``NanoVisionImageProcessor``) or ``pixel_values`` (processed, [n, 3, H, W]) are
    concatenated in row-major placeholder order into ``pixel_values`` [num_images, 3, H, W]; an optional
    ``num_images`` is checked against them.

    No ``attention_mask`` is returned: the restarting ``position_ids`` already say where each document and the
    padding end. ``return_attention_mask=True`` adds the 2D padding mask (1 = real token); nanovision's models
    combine it with the documents of ``position_ids`` (eager, sdpa, flex_attention, nanovision_varlen) and refuse it
    on flash_attention_* for rows of several documents.

    flash_attention_2/3: transformers derives ``cu_seqlens`` from ``position_ids`` only for a batch of ONE row
    (``_is_packed_sequence`` checks ``batch_size == 1``); with several rows it would run plain causal attention
    across the documents of each row, so nanovision's models refuse that batch. Set ``return_flash_attn_kwargs=True``
    to add ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (int32 document boundaries over the flattened [B * L] tokens,
    padding documents included) and ``max_length_q`` / ``max_length_k`` (ints), which transformers' flash path uses
    for any batch size; eager, sdpa and flex_attention ignore them (they keep using ``position_ids``).
    """

    pad_token_id: int = 0
    max_length: int | None = None
    pack_on_the_fly: bool = False
    pad_to_multiple_of: int | None = None
    image_processor: Callable | None = None
    return_attention_mask: bool = False
    return_flash_attn_kwargs: bool = False
    label_pad_token_id: int = IGNORE_INDEX

    def __post_init__(self):
        if self.pack_on_the_fly and self.max_length is None:
            raise ValueError("PackedDataCollator(pack_on_the_fly=True) needs max_length, the row capacity")
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {self.max_length}")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {self.pad_to_multiple_of}")

    def __call__(self, features: list[dict[str, Any]], return_tensors: str | None = None) -> dict[str, Any]:
        if return_tensors not in (None, "pt"):
            raise ValueError(f"PackedDataCollator returns PyTorch tensors only, got return_tensors={return_tensors!r}")
        if not features:
            raise ValueError("PackedDataCollator got an empty batch")
        if self.pack_on_the_fly:
            rows = self._pack(features)
        else:
            rows = [self._packed_row(feature, index) for index, feature in enumerate(features)]
        return self._collate(rows)

    # -- rows

    def _document(self, feature: dict[str, Any], index: int):
        ids = _as_int_array(feature["input_ids"], "input_ids")
        labels = feature.get("labels")
        labels = ids.copy() if labels is None else _as_int_array(labels, "labels").copy()
        if labels.shape != ids.shape:
            raise ValueError(f"example {index}: {labels.size} labels for {ids.size} input_ids")
        images, pixel_values = self._images(feature, index)
        return ids, labels, images, pixel_values

    def _images(self, feature: dict[str, Any], index: int) -> tuple[list, list]:
        images = feature.get("images")
        images = [] if images is None else list(images)
        pixels = _as_pixel_tensor(feature.get("pixel_values"))
        if images and pixels is not None:
            raise ValueError(f"example {index} has both 'images' and 'pixel_values'; give one of them")
        count = len(images) if images else (0 if pixels is None else pixels.shape[0])
        declared = feature.get("num_images")
        if declared is not None and int(declared) != count:
            raise ValueError(
                f"example {index} declares num_images={int(declared)} but carries {count} images in "
                "'images' / 'pixel_values'"
            )
        if images and self.image_processor is None:
            raise ValueError("the features carry raw 'images': pass an image_processor to PackedDataCollator")
        return images, ([] if pixels is None else [pixels])

    def _packed_row(self, feature: dict[str, Any], index: int) -> _Row:
        ids, labels, images, pixel_values = self._document(feature, index)
        positions = feature.get("position_ids")
        if positions is not None:
            positions = _as_int_array(positions, "position_ids")
        elif feature.get("seq_lengths") is not None:
            seq_lengths = _as_int_array(feature["seq_lengths"], "seq_lengths")
            if seq_lengths.sum() != ids.size:
                raise ValueError(f"row {index}: seq_lengths sum to {int(seq_lengths.sum())}, not {ids.size} tokens")
            positions = np.arange(ids.size) - np.repeat(np.cumsum(seq_lengths) - seq_lengths, seq_lengths)
        else:
            positions = np.arange(ids.size)
        if positions.shape != ids.shape:
            raise ValueError(f"row {index}: {positions.size} position_ids for {ids.size} input_ids")
        if self.max_length is not None and ids.size > self.max_length:
            raise ValueError(f"row {index} has {ids.size} tokens, more than max_length={self.max_length}")
        return _Row(ids, labels, positions, images, pixel_values)

    def _pack(self, features: list[dict[str, Any]]) -> list[_Row]:
        documents = [self._document(feature, index) for index, feature in enumerate(features)]
        for index, (ids, *_) in enumerate(documents):
            if ids.size > self.max_length:
                raise ValueError(
                    f"example {index} of the batch has {ids.size} tokens, more than max_length={self.max_length}: "
                    "on-the-fly packing cannot split an example. Truncate beforehand, e.g. with "
                    "nanovision.training.dataset_packing.pack_dataset(dataset, max_length), which truncates "
                    "over-long examples without splitting images and counts what it drops."
                )
            if ids.size == 0:
                raise ValueError(f"example {index} of the batch has no tokens")
        rows = []
        for members in first_fit_decreasing([doc[0].size for doc in documents], self.max_length):
            parts = [documents[i] for i in members]
            rows.append(
                _Row(
                    input_ids=np.concatenate([p[0] for p in parts]),
                    labels=np.concatenate([p[1] for p in parts]),
                    position_ids=np.concatenate([np.arange(p[0].size) for p in parts]),
                    images=[image for p in parts for image in p[2]],
                    pixel_values=[pixels for p in parts for pixels in p[3]],
                )
            )
        return rows

    # -- batch

    def _collate(self, rows: list[_Row]) -> dict[str, torch.Tensor]:
        width = max(row.input_ids.size for row in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = np.full((len(rows), width), self.pad_token_id, dtype=np.int64)
        labels = np.full((len(rows), width), self.label_pad_token_id, dtype=np.int64)
        position_ids = np.zeros((len(rows), width), dtype=np.int64)
        attention_mask = np.zeros((len(rows), width), dtype=np.int64)
        for r, row in enumerate(rows):
            n = row.input_ids.size
            input_ids[r, :n] = row.input_ids
            labels[r, :n] = np.where(row.position_ids == 0, IGNORE_INDEX, row.labels)
            position_ids[r, :n] = row.position_ids
            position_ids[r, n:] = np.arange(width - n)  # padding: one more document
            attention_mask[r, :n] = 1
        batch = {
            "input_ids": torch.from_numpy(input_ids),
            "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(position_ids),
        }
        if self.return_attention_mask:
            batch["attention_mask"] = torch.from_numpy(attention_mask)
        if self.return_flash_attn_kwargs:
            boundaries, longest = document_bounds(batch["position_ids"])
            batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = boundaries
            batch["max_length_q"] = batch["max_length_k"] = longest
        images = [image for row in rows for image in row.images]
        pixel_values = [pixels for row in rows for pixels in row.pixel_values]
        if images and pixel_values:
            raise ValueError("the batch mixes raw 'images' and processed 'pixel_values'; give one kind")
        if images:
            batch["pixel_values"] = torch.as_tensor(self.image_processor(images, return_tensors="pt")["pixel_values"])
        elif pixel_values:
            batch["pixel_values"] = torch.cat(pixel_values)
        return batch

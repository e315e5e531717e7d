"""Sequence packing for nanovision training.

Packing puts several tokenized examples ("documents") into one row so that a batch holds almost no padding.
nanovision models (and transformers in general) accept packed rows without any attention mask:

* ``input_ids`` [B, L]: the documents of a row, one after the other, then padding;
* ``position_ids`` [B, L]: restart at 0 at each document start. With ``attention_mask=None`` transformers detects
  the restarts and builds a block-diagonal causal mask (eager / sdpa / flex_attention) or the ``cu_seqlens`` of
  flash_attention_2, so no token attends to another document;
* ``labels`` [B, L]: the model shifts them (the label at position t is the target of position t - 1), so the first
  token of each document gets -100: the last token of a document never learns to predict the next document.

Row padding is given position ids 0, 1, ... like one more (tiny) document, so the mask stays block-diagonal: padding
tokens attend only to each other and real tokens never see them; their labels are -100, so they add nothing to the
loss. Packed training is then exactly unpacked training (same loss and gradients, see tests/test_packing.py) with
transformers' loss normalisation by ``num_items_in_batch``.

Two ways to use it:

* ahead of time: `pack_dataset` truncates over-long examples (counting what it drops, never splitting an image),
  bin-packs the examples with best-fit decreasing (`pack_examples`) and returns one row per pack; `PackedDataCollator`
  then only pads rows to the batch's longest;
* on the fly: ``PackedDataCollator(pack_on_the_fly=True, max_length=...)`` packs each batch of individual examples
  (first-fit decreasing); the number of rows then varies from batch to batch.

With HF ``Trainer`` pass ``remove_unused_columns=False`` in ``TrainingArguments``: otherwise Trainer removes the
columns the model's ``forward`` does not name (``images``, ``seq_lengths``, ``num_images``) before the collator sees
them. Trainer counts ``num_items_in_batch`` from ``labels[..., 1:] != -100``, which the -100 at document starts makes
equal to the unpacked count.

Images: an example's images travel in a list column (``images``: raw images for an ``image_processor``, or
``pixel_values``: already processed [3, H, W] arrays), in the order of their ``<image>`` placeholders; the packed row
and the batch keep them in that order (row-major), which is the order the model fills the placeholders in.
"""

from __future__ import annotations

import logging
from bisect import bisect_left, insort
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from itertools import chain
from typing import Any

import numpy as np
import torch

from ..kernels import document_bounds

logger = logging.getLogger("nanovision")

IGNORE_INDEX = -100
IMAGE_COLUMNS = ("images", "pixel_values")
_PACKED_ROWS_PER_CHUNK = 8192  # rows built per Arrow chunk in pack_dataset (bounds memory and list offsets)

__all__ = ["IGNORE_INDEX", "PackedDataCollator", "PackingStats", "pack_dataset", "pack_examples"]


# ------------------------------------------------------------------------------------------------ bin packing


def _check_lengths(lengths: Sequence[int], max_length: int) -> list[int]:
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    lengths = [int(length) for length in lengths]
    for index, length in enumerate(lengths):
        if length < 1:
            raise ValueError(f"example {index} is empty (length {length}): remove empty examples before packing")
        if length > max_length:
            raise ValueError(
                f"example {index} has {length} tokens, more than max_length={max_length}: truncate it first "
                "(pack_dataset truncates and counts what it drops)"
            )
    return lengths


def pack_examples(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing: group example indices into rows of at most ``max_length`` tokens.

    Examples are placed longest first, each into the open row whose remaining capacity is the smallest that still
    fits it (a new row when none does). Open rows are kept in buckets keyed by remaining capacity, with the distinct
    capacities in a sorted list searched by bisection: O(n log n) overall, ~0.2 s for 100k examples.

    Every index appears exactly once. Rows are returned in creation order (the first rows hold the longest examples);
    within a row, indices are in placement order. Raises ValueError for an empty example or one longer than
    ``max_length`` (the caller truncates first).
    """
    lengths = _check_lengths(lengths, max_length)
    order = sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True)  # stable: ties keep index order
    rows: list[list[int]] = []
    capacities: list[int] = []  # sorted distinct remaining capacities (> 0) of open rows
    rows_by_capacity: dict[int, list[int]] = {}
    for index in order:
        length = lengths[index]
        slot = bisect_left(capacities, length)
        if slot == len(capacities):  # nothing fits: open a row
            row = len(rows)
            rows.append([index])
            remaining = max_length - length
        else:  # best fit: the tightest row that still has room
            remaining = capacities[slot]
            bucket = rows_by_capacity[remaining]
            row = bucket.pop()
            if not bucket:
                del rows_by_capacity[remaining]
                del capacities[slot]
            rows[row].append(index)
            remaining -= length
        if remaining > 0:
            bucket = rows_by_capacity.get(remaining)
            if bucket is None:
                rows_by_capacity[remaining] = [row]
                insort(capacities, remaining)
            else:
                bucket.append(row)
    return rows


def first_fit_decreasing(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """First-fit decreasing, for the few examples of one batch: longest first, each into the first row with room."""
    lengths = _check_lengths(lengths, max_length)
    rows: list[list[int]] = []
    remaining: list[int] = []
    for index in sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True):
        length = lengths[index]
        for row, room in enumerate(remaining):
            if room >= length:
                rows[row].append(index)
                remaining[row] -= length
                break
        else:
            rows.append([index])
            remaining.append(max_length - length)
    return rows


# ------------------------------------------------------------------------------------------------ statistics


@dataclass
class PackingStats:
    """What packing did to a dataset.

    ``tokens`` counts real tokens after truncation. The two padding wastes compare the same tokens laid out in
    rows of ``max_length``: ``padding_waste_before`` with one example per row (``1 - tokens / (examples_in *
    max_length)``), ``padding_waste_after`` with the packed rows (``1 - tokens / (rows_out * max_length)``).
    ``compression_ratio`` is ``examples_in / rows_out``. Nothing is dropped: every example lands in a row, and
    ``truncated_*`` count the examples cut to ``max_length``, the tokens and the whole images removed from them.
    """

    max_length: int
    examples_in: int = 0
    rows_out: int = 0
    tokens: int = 0
    truncated_examples: int = 0
    truncated_tokens: int = 0
    truncated_images: int = 0

    @property
    def padding_waste_before(self) -> float:
        capacity = self.examples_in * self.max_length
        return 1.0 - self.tokens / capacity if capacity else 0.0

    @property
    def padding_waste_after(self) -> float:
        capacity = self.rows_out * self.max_length
        return 1.0 - self.tokens / capacity if capacity else 0.0

    @property
    def compression_ratio(self) -> float:
        return self.examples_in / self.rows_out if self.rows_out else 0.0

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            padding_waste_before=self.padding_waste_before,
            padding_waste_after=self.padding_waste_after,
            compression_ratio=self.compression_ratio,
        )
        return data

    def summary(self) -> str:
        line = (
            f"packed {self.examples_in:,} examples into {self.rows_out:,} rows of max_length {self.max_length:,} "
            f"({self.compression_ratio:.2f} examples/row, {self.tokens:,} tokens); padding waste "
            f"{self.padding_waste_before:.1%} unpacked -> {self.padding_waste_after:.1%} packed"
        )
        if self.truncated_examples:
            line += (
                f"; truncated {self.truncated_examples:,} examples, dropping {self.truncated_tokens:,} tokens and "
                f"{self.truncated_images:,} images"
            )
        return line

    def log(self, level: int = logging.INFO) -> None:
        logger.log(level, self.summary())


# ------------------------------------------------------------------------------------------------ truncation


def _image_safe_cut(
    ids: np.ndarray,
    max_length: int,
    num_images: int | None,
    image_token_id: int,
    image_start_token_id: int | None,
    image_end_token_id: int | None,
    num_image_tokens: int | None,
    where: str,
) -> tuple[int, int, int]:
    """Where to cut ``ids`` (longer than ``max_length``) so that no image is split: (cut, images, images kept).

    An image is ``num_image_tokens`` consecutive image tokens, with the start / end marker right around them when
    those ids are given. Without ``num_image_tokens``, it is inferred as image tokens / ``num_images``; when the
    image count is unknown too, each run of consecutive image tokens is one image.
    """
    positions = np.flatnonzero(ids == image_token_id)
    if num_image_tokens is None and num_images:
        if positions.size % num_images:
            raise ValueError(
                f"{where} has {num_images} images but {positions.size} image tokens (id {image_token_id}), "
                "not a multiple: cannot tell where each image starts"
            )
        num_image_tokens = positions.size // num_images
    if positions.size == 0:
        firsts = lasts = positions
    elif num_image_tokens is not None:
        if positions.size % num_image_tokens:
            raise ValueError(
                f"{where} has {positions.size} image tokens (id {image_token_id}), not a multiple of "
                f"num_image_tokens={num_image_tokens}"
            )
        firsts, lasts = positions[::num_image_tokens], positions[num_image_tokens - 1 :: num_image_tokens]
    else:
        breaks = np.flatnonzero(np.diff(positions) != 1) + 1
        firsts = positions[np.concatenate([[0], breaks])]
        lasts = positions[np.concatenate([breaks - 1, [positions.size - 1]])]
    if num_images is not None and firsts.size != num_images:
        raise ValueError(
            f"{where} has {num_images} images but {firsts.size} image placeholders (image token id {image_token_id})"
        )
    starts, ends = firsts.copy(), lasts.copy()
    if image_start_token_id is not None:
        has_marker = firsts > 0
        has_marker[has_marker] = ids[firsts[has_marker] - 1] == image_start_token_id
        starts -= has_marker
    if image_end_token_id is not None:
        has_marker = lasts + 1 < ids.size
        has_marker[has_marker] = ids[lasts[has_marker] + 1] == image_end_token_id
        ends += has_marker
    cut = max_length
    split = (starts < cut) & (cut <= ends)  # the image (with its markers) spans positions starts..ends inclusive
    if split.any():
        cut = int(starts[split][0])
    if cut == 0:
        raise ValueError(
            f"{where}: its first image takes positions 0..{int(ends[0])}, beyond max_length={max_length}; "
            "truncating without splitting it would leave the example empty. Raise max_length."
        )
    return cut, int(firsts.size), int((ends < cut).sum())


def _list_lengths(column) -> np.ndarray:
    import pyarrow.compute as pc

    if column.null_count:
        raise ValueError("packing needs a list in every row; found missing (null) values")
    return pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)


def _flat_values(column):
    """The concatenated list items of an Arrow list column (chunked or not), as one Arrow array."""
    import pyarrow as pa
    import pyarrow.compute as pc

    flat = pc.list_flatten(column)
    return flat.combine_chunks() if isinstance(flat, pa.ChunkedArray) else flat


def _build_lists(list_type, lengths: np.ndarray, values):
    """A list array of `list_type` whose row i holds the next lengths[i] items of `values`."""
    import pyarrow as pa

    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if pa.types.is_large_list(list_type):
        return pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), values, type=list_type)
    if offsets[-1] > np.iinfo(np.int32).max:
        raise ValueError("a packed chunk holds more than 2**31 list items; lower _PACKED_ROWS_PER_CHUNK")
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values, type=list_type)


def _take_prefixes(column, keep: np.ndarray):
    """Row i of a list column cut to its first keep[i] items."""
    import pyarrow as pa

    lengths = _list_lengths(column)
    if np.array_equal(lengths, keep):
        return column
    starts = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    new_starts = np.zeros(len(keep), dtype=np.int64)
    np.cumsum(keep[:-1], out=new_starts[1:])
    take = np.repeat(starts - new_starts, keep) + np.arange(int(keep.sum()), dtype=np.int64)
    values = _flat_values(column).take(pa.array(take))
    return _build_lists(column.type, keep, values)


@dataclass
class _Truncator:
    """datasets.map function (Arrow batches in and out) that cuts examples to max_length without splitting images."""

    max_length: int
    token_columns: list[str]
    image_columns: list[str]
    has_num_images: bool
    image_token_id: int | None
    image_start_token_id: int | None
    image_end_token_id: int | None
    num_image_tokens: int | None

    def __call__(self, table, indices):
        import pyarrow as pa

        lengths = _list_lengths(table["input_ids"])
        for name in self.token_columns[1:]:
            if not np.array_equal(_list_lengths(table[name]), lengths):
                raise ValueError(f"column {name!r} must hold as many items as input_ids in every example")
        image_counts = self._image_counts(table)
        keep = np.minimum(lengths, self.max_length)
        kept_images = image_counts.copy() if image_counts is not None else None
        dropped_images = np.zeros(len(lengths), dtype=np.int64)
        long_rows = np.flatnonzero(lengths > self.max_length)
        if long_rows.size and self.image_token_id is not None:
            ids = _flat_values(table["input_ids"]).to_numpy(zero_copy_only=False)
            starts = np.zeros(len(lengths), dtype=np.int64)
            np.cumsum(lengths[:-1], out=starts[1:])
            for row in long_rows:
                count = None if image_counts is None else int(image_counts[row])
                cut, total, kept = _image_safe_cut(
                    ids[starts[row] : starts[row] + lengths[row]], self.max_length, count, self.image_token_id,
                    self.image_start_token_id, self.image_end_token_id, self.num_image_tokens,
                    where=f"example {indices[row]}",
                )
                keep[row] = cut
                dropped_images[row] = total - kept
                if kept_images is not None:
                    kept_images[row] = kept
        elif long_rows.size and image_counts is not None and image_counts[long_rows].any():
            row = int(long_rows[np.flatnonzero(image_counts[long_rows])[0]])
            raise ValueError(
                f"example {indices[row]} has {int(lengths[row])} tokens and images: truncating it to "
                f"max_length={self.max_length} needs image_token_id (and image_start/end_token_id) to avoid "
                "splitting an image; pass them to pack_dataset (a NanoVisionProcessor has them as attributes)"
            )
        columns = {name: _take_prefixes(table[name], keep) for name in self.token_columns}
        if kept_images is not None:
            for name in self.image_columns:
                columns[name] = _take_prefixes(table[name], kept_images)
            if self.has_num_images:
                columns["num_images"] = pa.array(kept_images, type=table.schema.field("num_images").type)
        columns["_nanovision_dropped_images"] = pa.array(dropped_images, pa.int64())
        return pa.table(columns)

    def _image_counts(self, table) -> np.ndarray | None:
        counts = None
        for name in self.image_columns:
            column_counts = _list_lengths(table[name])
            if counts is not None and not np.array_equal(counts, column_counts):
                raise ValueError(f"image columns {self.image_columns} disagree on the number of images per example")
            counts = column_counts
        if self.has_num_images:
            declared = table["num_images"].to_numpy(zero_copy_only=False).astype(np.int64)
            if counts is not None and not np.array_equal(counts, declared):
                row = int(np.flatnonzero(counts != declared)[0])
                raise ValueError(
                    f"num_images ({int(declared[row])}) does not match the {int(counts[row])} items of "
                    f"{self.image_columns} in an example"
                )
            counts = declared
        return counts


# ------------------------------------------------------------------------------------------------ pack_dataset


def pack_dataset(
    dataset,
    max_length: int,
    num_proc: int | None = None,
    *,
    image_token_id: int | None = None,
    image_start_token_id: int | None = None,
    image_end_token_id: int | None = None,
    num_image_tokens: int | None = None,
    image_columns: Sequence[str] = IMAGE_COLUMNS,
    log_stats: bool = True,
):
    """Pack a tokenized ``datasets.Dataset`` into rows of at most ``max_length`` tokens.

    Input columns: ``input_ids`` (list of ints), optional ``labels`` (same length; defaults to ``input_ids``),
    optional image list columns (``images`` and/or ``pixel_values``, any item type, one item per image in placeholder
    order) and optional ``num_images`` (int). An ``attention_mask`` column must be all ones (unpadded examples) and is
    dropped; any other column is dropped too (it cannot be concatenated meaningfully), with an info log.

    Examples longer than ``max_length`` are truncated, never dropped: the cut moves back to the start of an image it
    would split (its ``image_start_token_id`` marker included), and the images after the cut are removed from the
    image columns. Image boundaries come from ``image_token_id`` and ``num_image_tokens`` tokens per image (inferred
    from the example's image count when not given); a warning logs how many examples, tokens and images truncation
    removed. ``num_proc`` parallelises the truncation (``datasets.map``); the packing itself is vectorised.

    Returns ``(packed, stats)``. Each packed row holds its examples concatenated: ``input_ids``, ``labels`` (-100 at
    every document start), ``position_ids`` (0.. per document), ``seq_lengths`` (document lengths), the image
    columns (images in document order) and ``num_images`` (per row) when the input had images. Rows are not padded:
    `PackedDataCollator` pads each batch. Rows come in packing order (longest examples first); shuffle the result or
    let the Trainer's sampler do it. The packed dataset is built in memory (``save_to_disk`` it to reuse it).
    """
    import datasets
    import pyarrow as pa

    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"pack_dataset needs a datasets.Dataset, got {type(dataset).__name__}")
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    names = dataset.column_names
    if "input_ids" not in names:
        raise ValueError(f"pack_dataset needs an 'input_ids' column; the dataset has {names}")
    token_columns = [name for name in ("input_ids", "labels") if name in names]
    image_cols = [name for name in image_columns if name in names]
    has_num_images = "num_images" in names
    kept_columns = token_columns + image_cols + (["num_images"] if has_num_images else [])
    dropped_columns = [name for name in names if name not in kept_columns]
    if "attention_mask" in names:
        _check_unpadded(dataset)
    if dropped_columns:
        logger.info("pack_dataset drops the columns %s (not concatenated into packed rows)", dropped_columns)
    source = dataset.select_columns(kept_columns)
    features = source.features
    stats = PackingStats(max_length=max_length, examples_in=len(source))

    table = source.with_format("arrow")[:] if len(source) else None
    lengths = _list_lengths(table["input_ids"]) if table is not None else np.zeros(0, dtype=np.int64)
    empty = np.flatnonzero(lengths == 0)
    if empty.size:
        raise ValueError(f"{empty.size} examples have no tokens (first: example {int(empty[0])}); remove them first")
    if "labels" in token_columns and table is not None:
        mismatched = np.flatnonzero(_list_lengths(table["labels"]) != lengths)
        if mismatched.size:
            raise ValueError(
                f"{mismatched.size} examples do not have one label per input_id (first: example {int(mismatched[0])})"
            )
    if (lengths > max_length).any():
        truncator = _Truncator(max_length, token_columns, image_cols, has_num_images, image_token_id,
                               image_start_token_id, image_end_token_id, num_image_tokens)
        out_features = features.copy()
        out_features["_nanovision_dropped_images"] = datasets.Value("int64")
        truncated = source.with_format("arrow").map(
            truncator, batched=True, with_indices=True, num_proc=num_proc, features=out_features,
            desc=f"Truncating examples to {max_length} tokens",
        )
        table = truncated.with_format("arrow")[:]
        dropped_images = table["_nanovision_dropped_images"].to_numpy().astype(np.int64)
        table = table.drop_columns(["_nanovision_dropped_images"])
        new_lengths = _list_lengths(table["input_ids"])
        stats.truncated_examples = int((new_lengths < lengths).sum())
        stats.truncated_tokens = int((lengths - new_lengths).sum())
        stats.truncated_images = int(dropped_images.sum())
        lengths = new_lengths
        logger.warning(
            "pack_dataset truncated %d of %d examples to max_length=%d (they were longer), dropping %d tokens and %d "
            "images (an image the cut would split is removed whole)",
            stats.truncated_examples, stats.examples_in, max_length, stats.truncated_tokens, stats.truncated_images,
        )
    stats.tokens = int(lengths.sum())

    rows = pack_examples(lengths, max_length) if len(lengths) else []
    stats.rows_out = len(rows)
    out_features = _packed_features(features, token_columns, image_cols, has_num_images or bool(image_cols))
    chunks = [
        _pack_chunk(table, lengths, rows[start : start + _PACKED_ROWS_PER_CHUNK], out_features, image_cols,
                    has_num_images)
        for start in range(0, len(rows), _PACKED_ROWS_PER_CHUNK)
    ]
    schema = out_features.arrow_schema
    packed_table = pa.concat_tables(chunks) if chunks else schema.empty_table()
    # An explicit fingerprint: datasets would otherwise hash the whole table (seconds for 100k examples).
    fingerprint = datasets.fingerprint.Hasher.hash(
        ["nanovision.pack_dataset/1", dataset._fingerprint, max_length, image_token_id, image_start_token_id,
         image_end_token_id, num_image_tokens, list(image_columns)]
    )
    packed = datasets.Dataset(
        datasets.table.InMemoryTable(packed_table), info=datasets.DatasetInfo(features=out_features),
        fingerprint=fingerprint,
    )
    if log_stats:
        stats.log()
    return packed, stats


def _check_unpadded(dataset) -> None:
    import pyarrow.compute as pc

    if not len(dataset):
        return
    mask = _flat_values(dataset.select_columns(["attention_mask"]).with_format("arrow")[:]["attention_mask"])
    if len(mask) and pc.min(mask).as_py() != 1:
        raise ValueError(
            "the attention_mask column holds zeros: the examples are padded. Tokenize without padding before packing."
        )


def _packed_features(features, token_columns, image_cols, with_num_images):
    import datasets

    ids_feature = features["input_ids"]
    if "labels" in token_columns:
        labels_feature = features["labels"]
    else:
        dtype = getattr(getattr(ids_feature, "feature", None), "dtype", "int64")
        labels_feature = ids_feature if str(dtype).startswith("int") else datasets.List(datasets.Value("int64"))
    out = {
        "input_ids": ids_feature,
        "labels": labels_feature,
        "position_ids": datasets.List(datasets.Value("int32")),
        "seq_lengths": datasets.List(datasets.Value("int32")),
    }
    for name in image_cols:
        out[name] = features[name]
    if with_num_images:
        out["num_images"] = datasets.Value("int32")
    return datasets.Features(out)


def _pack_chunk(table, lengths, rows, features, image_cols, has_num_images):
    import pyarrow as pa

    schema = features.arrow_schema
    docs = np.fromiter(chain.from_iterable(rows), dtype=np.int64)
    docs_per_row = np.fromiter((len(row) for row in rows), dtype=np.int64, count=len(rows))
    first_doc = np.zeros(len(rows), dtype=np.int64)
    np.cumsum(docs_per_row[:-1], out=first_doc[1:])
    doc_lengths = lengths[docs]
    row_lengths = np.add.reduceat(doc_lengths, first_doc)
    doc_starts = np.zeros(len(docs), dtype=np.int64)
    np.cumsum(doc_lengths[:-1], out=doc_starts[1:])
    num_tokens = int(doc_lengths.sum())

    take = pa.array(docs)
    ids = _flat_values(table["input_ids"].take(take))
    label_source = table["labels"] if "labels" in table.column_names else table["input_ids"]
    labels = _flat_values(label_source.take(take)).to_numpy(zero_copy_only=False).astype(np.int64)
    labels[doc_starts] = IGNORE_INDEX
    positions = np.arange(num_tokens, dtype=np.int64) - np.repeat(doc_starts, doc_lengths)

    def list_type(name):
        return schema.field(name).type

    columns = {
        "input_ids": _build_lists(list_type("input_ids"), row_lengths, ids.cast(list_type("input_ids").value_type)),
        "labels": _build_lists(list_type("labels"), row_lengths,
                               pa.array(labels).cast(list_type("labels").value_type)),
        "position_ids": _build_lists(list_type("position_ids"), row_lengths, pa.array(positions, pa.int32())),
        "seq_lengths": _build_lists(list_type("seq_lengths"), docs_per_row, pa.array(doc_lengths, pa.int32())),
    }
    image_counts = None
    for name in image_cols:
        column = table[name].take(take)
        doc_images = _list_lengths(column)
        image_counts = np.add.reduceat(doc_images, first_doc) if len(doc_images) else doc_images
        columns[name] = _build_lists(list_type(name), image_counts, _flat_values(column))
    if "num_images" in schema.names:
        if image_counts is None:
            per_doc = table["num_images"].take(take).to_numpy(zero_copy_only=False).astype(np.int64)
            image_counts = np.add.reduceat(per_doc, first_doc)
        columns["num_images"] = pa.array(image_counts, pa.int32())
    return pa.Table.from_arrays([columns[name] for name in schema.names], schema=schema)


# ------------------------------------------------------------------------------------------------ collator


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

    Padding: ``pad_token_id`` with label -100 and position ids 0, 1, ... after the row's last document, i.e. one
    more document: transformers' packed-sequence mask keeps it block-diagonal, padding tokens attend only to each
    other and never to (or from) real tokens, and add nothing to the loss. The first token of every document (every
    position id 0) gets label -100, whatever the feature says: the model shifts labels, so that label would make the
    previous document's last token predict the next document.

    Images: a feature's ``images`` (raw, processed here by ``image_processor(images, return_tensors="pt")
    ["pixel_values"]``, e.g. a ``NanoVisionImageProcessor``) or ``pixel_values`` (processed, [n, 3, H, W]) are
    concatenated in row-major placeholder order into ``pixel_values`` [num_images, 3, H, W]; an optional
    ``num_images`` is checked against them.

    No ``attention_mask`` is returned: with one, transformers stops detecting the documents of a row and lets them
    attend to each other. ``return_attention_mask=True`` adds the 2D padding mask (1 = real token) for other
    consumers; do not pass it to the model if documents must stay separate.

    flash_attention_2/3: transformers derives ``cu_seqlens`` from ``position_ids`` only for a batch of ONE row
    (``_is_packed_sequence`` checks ``batch_size == 1``); with several rows it silently runs plain causal attention
    across the documents of each row. Set ``return_flash_attn_kwargs=True`` to add ``cu_seq_lens_q`` /
    ``cu_seq_lens_k`` (int32 document boundaries over the flattened [B * L] tokens, padding documents included)
    and ``max_length_q`` / ``max_length_k`` (ints), which transformers' flash path uses for any batch size; eager,
    sdpa and flex_attention ignore them (they keep using ``position_ids``).
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
        if self.return_attention_mask:
            logger.warning(
                "PackedDataCollator(return_attention_mask=True): an attention_mask passed to the model disables "
                "transformers' packed-document masking, so documents of a row would attend to each other."
            )

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
                    "nanovision.training.packing.pack_dataset(dataset, max_length), which truncates over-long "
                    "examples without splitting images and counts what it drops."
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

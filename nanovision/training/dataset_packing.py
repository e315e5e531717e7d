"""Dataset packing: several tokenized examples ("documents") in one row, so that a batch holds almost no padding.

nanovision models (and transformers in general) accept packed rows without any attention mask:

* ``input_ids`` [B, L]: the documents of a row, one after the other, then padding;
* ``position_ids`` [B, L]: restart at 0 at each document start. With ``attention_mask=None`` transformers detects
  the restarts and builds a block-diagonal causal mask (eager / sdpa / flex_attention) or the ``cu_seqlens`` of
  flash_attention_2, so no token attends to another document;
* ``labels`` [B, L]: the model shifts them (the label at position t is the target of position t - 1), so the first
  token of each document gets IGNORE_INDEX: the last token of a document never learns to predict the next document.

Row padding is given position ids 0, 1, ... like one more (tiny) document, so the mask stays block-diagonal: padding
tokens attend only to each other and real tokens never see them; their labels are IGNORE_INDEX, so they add nothing to
the loss. Packed training is then exactly unpacked training (same loss and gradients, see tests/test_packing.py) with
transformers' loss normalisation by ``num_items_in_batch``.

Two ways to use it:

* ahead of time: `pack_dataset` truncates over-long examples (counting what it drops, never splitting an image),
  bin-packs the examples with best-fit decreasing (`pack_examples`) and returns one row per pack; the
  `PackedDataCollator` (training/collator.py) then only pads rows to the batch's longest;
* on the fly: ``PackedDataCollator(pack_on_the_fly=True, max_length=...)`` packs each batch of individual examples
  (first-fit decreasing); the number of rows then varies from batch to batch.

Images: an example's images travel in a list column (``images``: raw images for an ``image_processor``, or
``pixel_values``: already processed [3, H, W] arrays), in the order of their ``<image>`` placeholders; the packed row
and the batch keep them in that order (row-major), which is the order the model fills the placeholders in.
"""

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from itertools import chain
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..modeling_nanovision import IGNORE_INDEX
from .bin_packing import pack_examples

logger = logging.getLogger("nanovision")

IMAGE_COLUMNS = ("images", "pixel_values")
PACKED_ROWS_PER_CHUNK = 8192  # rows built per Arrow chunk in pack_dataset (bounds the memory of the intermediates)
LIST_ITEMS_LIMIT = np.iinfo(np.int32).max  # a datasets.List column's items (int32 Arrow offsets); more need LargeList
DROPPED_IMAGES_COLUMN = "_nanovision_dropped_images"  # per-example count the truncation hands back to pack_dataset


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
            f"{where} has {ids.size} tokens and its first image takes positions 0..{int(ends[0])}, beyond "
            f"max_length={max_length}: truncating without splitting the image would leave the example empty. Raise "
            f"max_length (nanovision train: --pack_max_length) to at least {int(ends[0]) + 1}."
        )
    return cut, int(firsts.size), int((ends < cut).sum())


def _list_lengths(column) -> np.ndarray:
    if column.null_count:
        raise ValueError("packing needs a list in every row; found missing (null) values")
    return pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)


def _flat_values(column):
    """The concatenated list items of an Arrow list column (chunked or not), as one Arrow array."""
    flat = pc.list_flatten(column)
    return flat.combine_chunks() if isinstance(flat, pa.ChunkedArray) else flat


def _build_lists(list_type, lengths: np.ndarray, values):
    """A list array of `list_type` whose row i holds the next lengths[i] items of `values`."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if pa.types.is_large_list(list_type):
        return pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), values, type=list_type)
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values, type=list_type)


def _take_prefixes(column, keep: np.ndarray):
    """Row i of a list column cut to its first keep[i] items."""
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
        if long_rows.size and "labels" in self.token_columns:
            self._check_targets_kept(table["labels"], lengths, keep, long_rows, indices)
        columns = {name: _take_prefixes(table[name], keep) for name in self.token_columns}
        if kept_images is not None:
            for name in self.image_columns:
                columns[name] = _take_prefixes(table[name], kept_images)
            if self.has_num_images:
                columns["num_images"] = pa.array(kept_images, type=table.schema.field("num_images").type)
        columns[DROPPED_IMAGES_COLUMN] = pa.array(dropped_images, pa.int64())
        return pa.table(columns)

    def _check_targets_kept(self, labels, lengths, keep, long_rows, indices) -> None:
        """Refuse a cut that keeps none of an example's labelled tokens: it would train on nothing, silently (a
        caption cut before its image, a conversation cut inside its prompt). The first label of an example never
        counts: packing masks every document start."""
        labels = _flat_values(labels).to_numpy(zero_copy_only=False)
        starts = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1], out=starts[1:])
        for row in long_rows:
            targets = np.flatnonzero(labels[starts[row] + 1 : starts[row] + lengths[row]] != IGNORE_INDEX) + 1
            if targets.size and targets[0] >= keep[row]:
                raise ValueError(
                    f"example {indices[row]} has {int(lengths[row])} tokens, more than max_length={self.max_length}, "
                    f"and its first labelled token is at position {int(targets[0])}: cut to {int(keep[row])} tokens "
                    "(never inside an image) it would keep nothing to learn. Raise max_length (nanovision train: "
                    f"--pack_max_length) to at least {int(targets[0]) + 1}, or shorten the example."
                )

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

    Returns ``(packed, stats)``. Each packed row holds its examples concatenated: ``input_ids``, ``labels``
    (IGNORE_INDEX at every document start), ``position_ids`` (0.. per document), ``seq_lengths`` (document lengths),
    the image columns (images in document order) and ``num_images`` (per row) when the input had images. Rows are not
    padded: `PackedDataCollator` pads each batch. Rows come in packing order (longest examples first); shuffle the
    result or let the Trainer's sampler do it. The packed dataset is built in memory (``save_to_disk`` it to reuse
    it).
    An empty dataset, or an over-long example that truncation would leave without any labelled token, raises
    ValueError naming the example and the ``max_length`` that keeps it.
    """
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
    if not len(dataset):
        raise ValueError(
            "pack_dataset got an empty dataset (0 examples): there is nothing to train on. Check the dataset and its "
            "split (nanovision train: --dataset, --dataset_split)."
        )
    source = dataset.select_columns(kept_columns)
    features = source.features
    stats = PackingStats(max_length=max_length, examples_in=len(source))

    table = source.with_format("arrow")[:]
    lengths = _list_lengths(table["input_ids"])
    empty = np.flatnonzero(lengths == 0)
    if empty.size:
        raise ValueError(f"{empty.size} examples have no tokens (first: example {int(empty[0])}); remove them first")
    if "labels" in token_columns:
        mismatched = np.flatnonzero(_list_lengths(table["labels"]) != lengths)
        if mismatched.size:
            raise ValueError(
                f"{mismatched.size} examples do not have one label per input_id (first: example {int(mismatched[0])})"
            )
    if (lengths > max_length).any():
        truncator = _Truncator(max_length, token_columns, image_cols, has_num_images, image_token_id,
                               image_start_token_id, image_end_token_id, num_image_tokens)
        truncated_features = features.copy()
        truncated_features[DROPPED_IMAGES_COLUMN] = datasets.Value("int64")
        truncated = source.with_format("arrow").map(
            truncator, batched=True, with_indices=True, num_proc=num_proc, features=truncated_features,
            desc=f"Truncating examples to {max_length} tokens",
        )
        truncated_table = truncated.with_format("arrow")[:]
        dropped_images = truncated_table[DROPPED_IMAGES_COLUMN].to_numpy()
        new_lengths = _list_lengths(truncated_table["input_ids"])
        source = truncated.remove_columns([DROPPED_IMAGES_COLUMN])
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

    out_features = _packed_features(features, token_columns, image_cols, has_num_images or bool(image_cols),
                                    large_lists=stats.tokens > LIST_ITEMS_LIMIT)
    packer = _Packer(max_length, out_features, image_cols, has_num_images)
    # The whole dataset is one batch (best fit needs every length); datasets derives the packed dataset's fingerprint
    # from the source's and the packer's settings, and keep_in_memory leaves no cache file behind.
    packed = source.with_format("arrow").map(
        packer, batched=True, batch_size=None, remove_columns=source.column_names, features=out_features,
        keep_in_memory=True, desc=f"Packing examples into rows of {max_length} tokens",
    ).with_format(None)
    stats.rows_out = len(packed)
    if log_stats:
        stats.log()
    return packed, stats


def _check_unpadded(dataset) -> None:
    mask = _flat_values(dataset.select_columns(["attention_mask"]).with_format("arrow")[:]["attention_mask"])
    if len(mask) and pc.min(mask).as_py() != 1:
        raise ValueError(
            "the attention_mask column holds zeros: the examples are padded. Tokenize without padding before packing."
        )


def _packed_features(features, token_columns, image_cols, with_num_images, large_lists=False):
    """The packed rows' features; ``large_lists``: the per-token columns as LargeList (int64 offsets), for packed
    datasets of more than LIST_ITEMS_LIMIT tokens."""
    ids_feature = features["input_ids"]
    if "labels" in token_columns:
        labels_feature = features["labels"]
    else:
        dtype = getattr(getattr(ids_feature, "feature", None), "dtype", "int64")
        labels_feature = ids_feature if str(dtype).startswith("int") else datasets.List(datasets.Value("int64"))
    token_list = datasets.LargeList if large_lists else datasets.List
    out = {
        "input_ids": token_list(ids_feature.feature) if large_lists else ids_feature,
        "labels": token_list(labels_feature.feature) if large_lists else labels_feature,
        "position_ids": token_list(datasets.Value("int32")),
        "seq_lengths": datasets.List(datasets.Value("int32")),
    }
    for name in image_cols:
        out[name] = features[name]
    if with_num_images:
        out["num_images"] = datasets.Value("int32")
    return datasets.Features(out)


@dataclass
class _Packer:
    """datasets.map function (the whole dataset as one Arrow batch in, packed rows out): best-fit-decreasing rows,
    built PACKED_ROWS_PER_CHUNK at a time."""

    max_length: int
    features: datasets.Features
    image_columns: list[str]
    has_num_images: bool

    def __call__(self, table):
        lengths = _list_lengths(table["input_ids"])
        rows = pack_examples(lengths, self.max_length)
        chunks = [
            _pack_chunk(table, lengths, rows[start : start + PACKED_ROWS_PER_CHUNK], self.features,
                        self.image_columns, self.has_num_images)
            for start in range(0, len(rows), PACKED_ROWS_PER_CHUNK)
        ]
        return pa.concat_tables(chunks)


def _pack_chunk(table, lengths, rows, features, image_cols, has_num_images):
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


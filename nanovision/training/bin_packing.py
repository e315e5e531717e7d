"""Bin packing: group examples, given by their token counts, into rows of at most ``max_length`` tokens."""

from bisect import bisect_left, insort
from collections.abc import Sequence


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
    capacities in a sorted list searched by bisection: O(n log n) overall.

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

"""The global block top-k of a row-sharded table as a distributed radix select.

Each rank holds the scores of its own blocks only. The k-th smallest score over every rank is found
digit by digit, most significant first, on integer order keys (one per block, ordering like the scores,
NaN largest): each pass histograms the digit of the keys still matching the prefix found so far, the
histograms are summed over ranks (one all-reduce of 2^11 counts per pass, whatever the table's size),
and every rank picks the same digit from the same sum. After the last pass the threshold key is known
exactly, with how many of its ties are selected; ties go to lower global block indices: one more
all-reduce counts the ties, and when only some of them are selected, a second select over the tied
blocks' global indices (unique keys, so it needs no tie rule of its own) picks the lowest.

Every collective here is an all-reduce (sum) of an int64 buffer of one fixed length, whose last
world_size slots are failure flags. A rank that raises between collectives joins the next collective
with its flag set, whatever that collective's purpose on the other ranks, so all ranks learn of the
failure in the same collective and none waits for a peer that left the schedule.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

__all__ = ["Exchange", "PeerFailure", "order_keys", "digit_schedule", "distributed_select", "RADIX_BITS"]

RADIX_BITS = 11  # digit width: 2^11 counts (16 KiB of int64) per histogram all-reduce


class PeerFailure(Exception):
    """Raised on every rank when a collective carries a failure flag; `ranks` lists who failed."""

    def __init__(self, ranks: list[int]):
        super().__init__(f"rank(s) {ranks} failed")
        self.ranks = ranks


class Exchange:
    """The collectives of one sharded step: all-reduces (sum) of a fixed-length int64 buffer, whose last
    world_size slots flag failed ranks. Counts the bytes each rank contributes (`bytes_sent`)."""

    def __init__(self, group, device: torch.device):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.device = device
        self.payload_len = max(1 << RADIX_BITS, self.world_size)
        self.bytes_sent = 0

    def all_reduce(self, payload: torch.Tensor | None = None, *, failed: bool = False) -> torch.Tensor:
        """Sum of every rank's payload (int64, at most payload_len values; zero-padded), or PeerFailure
        on every rank when any rank called with failed=True."""
        buffer = torch.zeros(self.payload_len + self.world_size, dtype=torch.int64, device=self.device)
        if payload is not None:
            buffer[:payload.numel()] = payload
        if failed:
            buffer[self.payload_len + self.rank] = 1
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=self.group)
        self.bytes_sent += buffer.numel() * buffer.element_size()
        failed_ranks = buffer[self.payload_len:].nonzero().flatten().tolist()
        if failed_ranks:
            raise PeerFailure(failed_ranks)
        return buffer[:self.payload_len]

    def all_reduce_long(self, values: torch.Tensor) -> torch.Tensor:
        """Sum over ranks of an int64 vector of any length (the same on every rank), in payload-sized
        all-reduces: the fixed length keeps a failing rank's flag collective the same as everyone's."""
        total = torch.empty_like(values)
        for start in range(0, values.numel(), self.payload_len):
            part = values[start:start + self.payload_len]
            total[start:start + part.numel()] = self.all_reduce(part)[:part.numel()]
        return total

    def fail(self) -> list[int]:
        """Joins the collective the healthy ranks are waiting in, flagging this rank; returns every
        failed rank (this one included)."""
        try:
            self.all_reduce(failed=True)
        except PeerFailure as failure:
            return failure.ranks
        raise AssertionError("a failure flag was lost in the all-reduce")


def order_keys(scores: torch.Tensor) -> torch.Tensor:
    """Signed integer keys that order like the float scores: -0.0 as +0.0, every NaN above +inf and equal.

    fp32 scores -> int32 keys, fp64 -> int64 (the rule of order_key in csrc/common/mask_math.h, on signed
    keys: a negative float's bits, read as a signed integer, order backwards, so all but the sign bit flip).
    """
    if scores.dtype == torch.float64:
        int_dtype, largest = torch.int64, (1 << 63) - 1
    else:
        scores, int_dtype, largest = scores.float(), torch.int32, (1 << 31) - 1
    values = scores + 0.0  # -0.0 + 0.0 == +0.0
    bits = values.view(int_dtype)
    keys = (bits >> (bits.element_size() * 8 - 1)).bitwise_and_(largest).bitwise_xor_(bits)  # flip if negative
    return keys.masked_fill_(values.isnan(), largest)


def digit_schedule(key_bits: int) -> list[tuple[int, int]]:
    """(shift, width) of each radix digit, most significant first, widths at most RADIX_BITS
    (32-bit keys: 11, 11, 10)."""
    passes = -(-key_bits // RADIX_BITS)
    widths = [key_bits // passes + (i < key_bits % passes) for i in range(passes)]
    schedule, shift = [], key_bits
    for width in widths:
        shift -= width
        schedule.append((shift, width))
    return schedule


def _digits(keys: torch.Tensor, shift: int, width: int, top: bool) -> torch.Tensor:
    """The digit of each signed key at (shift, width) as a bin index in [0, 2^width); the top digit
    carries the sign, so it is offset to put negative keys first."""
    shifted = keys >> shift
    if top:
        return shifted.add_(1 << (width - 1))
    return shifted.bitwise_and_((1 << width) - 1)


def distributed_select(keys: torch.Tensor, k: int, exchange: Exchange,
                       global_index: Callable[[torch.Tensor], torch.Tensor] | None = None,
                       index_space: int = 0) -> torch.Tensor:
    """The k smallest keys over every rank (1 <= k < total), ties by lower global index: a bool flag per
    local key. global_index(local positions) gives the keys' global indices, unique over ranks and below
    index_space; it may be None only when no two keys over all ranks are equal."""
    key_bits = 64 if keys.dtype == torch.int64 else 32
    ones = torch.ones(1, dtype=torch.int64, device=keys.device)
    candidates, positions, remaining, threshold = keys, None, k, 0  # positions: candidates' indices in keys
    for i, (shift, width) in enumerate(digit_schedule(key_bits)):
        digits = _digits(candidates, shift, width, top=i == 0)
        local_counts = torch.zeros(1 << width, dtype=torch.int64, device=keys.device)
        local_counts.index_add_(0, digits, ones.expand(digits.numel()))
        counts = exchange.all_reduce(local_counts)[:1 << width]
        below = counts.cumsum(0)
        digit = int(torch.searchsorted(below, remaining))  # first bin whose cumulative count reaches k
        remaining -= int(below[digit]) - int(counts[digit])
        threshold |= (digit - (1 << (width - 1)) if i == 0 else digit) << shift
        matching = (digits == digit).nonzero().flatten()
        del digits
        positions = matching if positions is None else positions[matching]
        candidates = candidates[matching]
    # The candidates left are the keys equal to the threshold, in index order; `remaining` of them over all
    # ranks are selected, the lowest global indices first.
    tie_counts = torch.zeros(exchange.world_size, dtype=torch.int64, device=keys.device)
    tie_counts[exchange.rank] = positions.numel()
    tie_counts = exchange.all_reduce(tie_counts)[:exchange.world_size]
    selected = keys < threshold
    if remaining == int(tie_counts.sum()):
        selected[positions] = True
    else:  # the `remaining` tied keys of lowest global index, found by a select over those indices
        if global_index is None:
            raise AssertionError("distributed_select: equal keys need their global indices to break ties")
        index_dtype = torch.int32 if index_space < 1 << 31 else torch.int64
        index_keys = global_index(positions).to(device=keys.device, dtype=index_dtype)
        selected[positions[distributed_select(index_keys, remaining, exchange)]] = True
    return selected

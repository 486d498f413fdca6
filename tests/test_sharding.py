"""Tensor-parallel shards between a prefill instance of P ranks and a decode instance of D
ranks: each decode rank ends up with exactly the shard it would have computed itself.

The check builds the whole tensor, shards it as the engine does for P and for D ranks,
moves the P shards' pieces as ``transfer_plan`` says, and compares with the D shards."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvwire.sharding import Piece, Segment, ShardedAxis, receives_of, sends_of, transfer_plan


def shards(axis: ShardedAxis, whole: np.ndarray, tp: int) -> list[np.ndarray]:
    """The engine's shards of ``whole`` (segments concatenated, each split by head) for ``tp`` ranks."""
    starts = np.cumsum([0] + [seg.num_heads * seg.head_size for seg in axis.segments])
    out = []
    for rank in range(tp):
        parts = []
        for s, seg in enumerate(axis.segments):
            for head in axis.held_heads(tp, rank, s):
                parts.append(whole[starts[s] + head * seg.head_size: starts[s] + (head + 1) * seg.head_size])
        out.append(np.concatenate(parts))
    return out


def moved(axis: ShardedAxis, whole: np.ndarray, source_tp: int, target_tp: int) -> list[np.ndarray]:
    sources = shards(axis, whole, source_tp)
    targets = [np.full(axis.local_size(target_tp), -1, dtype=whole.dtype) for _ in range(target_tp)]
    for piece in transfer_plan(axis, source_tp, target_tp):
        span = sources[piece.source][piece.source_start: piece.source_start + piece.length]
        targets[piece.target][piece.target_start: piece.target_start + piece.length] = span
    return targets


def whole_of(axis: ShardedAxis) -> np.ndarray:
    return np.arange(sum(seg.num_heads * seg.head_size for seg in axis.segments))


CASES = [  # (axis, P, D): the 8->4, 4->8, 2->8, TP above the KV heads, GDN's q/k/v, MLA
    (ShardedAxis.by_heads(8, 4), 8, 4),
    (ShardedAxis.by_heads(8, 4), 4, 8),
    (ShardedAxis.by_heads(8, 4), 2, 8),
    (ShardedAxis.by_heads(2, 4), 8, 4),  # 4 prefill replicas of each KV head
    (ShardedAxis.by_heads(2, 4), 1, 8),
    (ShardedAxis.by_heads(2, 4), 2, 1),
    (ShardedAxis.gdn_conv(2, 8, 16, 16), 2, 1),
    (ShardedAxis.gdn_conv(2, 8, 16, 16), 1, 2),
    (ShardedAxis.gdn_conv(4, 8, 16, 32), 4, 2),
    (ShardedAxis.replicated(576), 4, 2),
]


@pytest.mark.parametrize("axis,source_tp,target_tp", CASES)
def test_each_decode_rank_gets_exactly_its_shard(axis, source_tp, target_tp):
    got = moved(axis, whole_of(axis), source_tp, target_tp)
    for rank, (mine, expected) in enumerate(zip(got, shards(axis, whole_of(axis), target_tp))):
        assert mine.tolist() == expected.tolist(), f"decode rank {rank}"


@pytest.mark.parametrize("axis,source_tp,target_tp", CASES)
def test_each_element_travels_once_per_decode_rank(axis, source_tp, target_tp):
    """The bytes on the wire equal what the decode ranks hold: what a same-TP pair sends."""
    plan = transfer_plan(axis, source_tp, target_tp)
    assert sum(p.length for p in plan) == target_tp * axis.local_size(target_tp)
    for target in range(target_tp):
        covered = sorted((p.target_start, p.length) for p in receives_of(plan, target))
        position = 0
        for start, length in covered:  # no overlap, no gap
            assert start == position
            position += length
        assert position == axis.local_size(target_tp)


def test_a_replicated_head_comes_from_one_source_and_the_replicas_share_the_work():
    # 2 KV heads on 8 prefill ranks (4 replicas each), 4 decode ranks (2 per head)
    plan = transfer_plan(ShardedAxis.by_heads(2, 4), 8, 4)
    assert [(p.source, p.target) for p in plan] == [(0, 0), (1, 1), (6, 2), (7, 3)]
    assert [len(sends_of(plan, source)) for source in range(8)] == [1, 1, 0, 0, 0, 0, 1, 1]


def test_a_gdn_conv_state_joins_each_projection_on_its_own():
    """2 prefill ranks -> 1 decode rank: q0 q1 | k0 k1 | v0 v1, not rank 0's q k v then rank 1's."""
    axis = ShardedAxis.gdn_conv(2, 2, 1, 1)
    plan = transfer_plan(axis, 2, 1)
    assert [(p.source, p.source_start, p.target_start) for p in plan] == [
        (0, 0, 0), (1, 0, 1), (0, 1, 2), (1, 1, 3), (0, 2, 4), (1, 2, 5)]


def test_contiguous_runs_travel_as_one_piece():
    plan = transfer_plan(ShardedAxis.by_heads(8, 4), 1, 2)
    assert plan == [Piece(0, 0, 0, 0, 16), Piece(0, 1, 16, 0, 16)]


@pytest.mark.parametrize("heads,tp,message", [
    (3, 2, "kv heads: 3 heads cannot be split across TP 2"),
    (4, 6, "kv heads: 4 heads cannot be split across TP 6"),
    (4, 0, "tensor-parallel size must be at least 1, got 0"),
])
def test_a_combination_that_cannot_work_is_refused_with_the_reason(heads, tp, message):
    for source_tp, target_tp in ((1, tp), (tp, 1)):
        with pytest.raises(ValueError, match=message):
            transfer_plan(ShardedAxis.by_heads(heads, 8, "kv heads"), source_tp, target_tp)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([1, 2, 4, 8]), st.integers(1, 5)), min_size=1, max_size=3),
       st.sampled_from([1, 2, 4, 8, 16]), st.sampled_from([1, 2, 4, 8, 16]))
def test_any_power_of_two_combination(segments, source_tp, target_tp):
    axis = ShardedAxis(tuple(Segment(h, size) for h, size in segments))
    got = moved(axis, whole_of(axis), source_tp, target_tp)
    assert [g.tolist() for g in got] == [s.tolist() for s in shards(axis, whole_of(axis), target_tp)]

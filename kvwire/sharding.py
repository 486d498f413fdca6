"""How a request's KV, held in tensor-parallel shards, maps between a prefill instance of
P ranks and a decode instance of D ranks, when P and D differ.

Engines shard each KV tensor along one axis, by heads: attention KV by KV head, a
linear-attention recurrent state by value head, and a GatedDeltaNet conv state's channels
as the concatenation of its q, k and v projections, each split on its own (vLLM's
``|- Q -|- K -|-- V --|`` per rank), so one rank's axis is made of several segments.
Where TP exceeds a segment's heads, heads are replicated: ranks ``h*k .. h*k+k-1`` (``k =
TP // heads``) all hold head ``h``. An MLA latent is one head replicated on every rank.

``ShardedAxis`` describes such an axis; ``transfer_plan`` says which pieces of which prefill
rank's shard each decode rank needs, and where in its own shard they go: every decode
rank gets exactly its shard, each element once, a replicated head from one prefill rank
(decode ranks spread over the replicas), and no prefill rank sends what no decode rank
needs. Offsets and lengths count elements along the axis; no I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Segment:
    """``num_heads`` heads of ``head_size`` elements each, split across ranks by head."""

    num_heads: int
    head_size: int
    name: str = ""


@dataclass(frozen=True)
class Piece:
    """Elements ``source_start .. +length`` of prefill rank ``source``'s shard go to
    ``target_start .. +length`` of decode rank ``target``'s."""

    source: int
    target: int
    source_start: int
    target_start: int
    length: int


@dataclass(frozen=True)
class ShardedAxis:
    """One tensor axis as the engine shards it: its segments, in order."""

    segments: tuple[Segment, ...]

    @classmethod
    def by_heads(cls, num_heads: int, head_size: int = 1, name: str = "heads") -> ShardedAxis:
        """Attention KV (by KV head), a recurrent state (by value head)."""
        return cls((Segment(num_heads, head_size, name),))

    @classmethod
    def gdn_conv(cls, num_k_heads: int, num_v_heads: int, head_k_dim: int, head_v_dim: int) -> ShardedAxis:
        """A GatedDeltaNet conv state's channels: the q, k and v projections, each sharded on its own."""
        return cls((Segment(num_k_heads, head_k_dim, "q"), Segment(num_k_heads, head_k_dim, "k"),
                    Segment(num_v_heads, head_v_dim, "v")))

    @classmethod
    def replicated(cls, size: int, name: str = "replicated") -> ShardedAxis:
        """A tensor every rank holds whole (an MLA latent)."""
        return cls((Segment(1, size, name),))

    def check(self, tp: int) -> None:
        """ValueError, naming the segment, where ``tp`` ranks cannot hold this axis."""
        if tp < 1:
            raise ValueError(f"tensor-parallel size must be at least 1, got {tp}")
        for seg in self.segments:
            if seg.num_heads < 1 or seg.head_size < 1:
                raise ValueError(f"{seg.name or 'segment'}: {seg.num_heads} heads of {seg.head_size} is empty")
            if seg.num_heads % tp and tp % seg.num_heads:
                raise ValueError(f"{seg.name or 'segment'}: {seg.num_heads} heads cannot be split across "
                                 f"TP {tp} (neither divides the other)")

    def heads_per_rank(self, tp: int, segment: int) -> int:
        return max(1, self.segments[segment].num_heads // tp)

    def local_size(self, tp: int) -> int:
        """Elements along the axis in one rank's shard."""
        return sum(self.heads_per_rank(tp, s) * seg.head_size for s, seg in enumerate(self.segments))

    def held_heads(self, tp: int, rank: int, segment: int) -> range:
        """The heads (global numbers) of ``segment`` that ``rank`` holds."""
        heads = self.segments[segment].num_heads
        if tp <= heads:
            per = heads // tp
            return range(rank * per, (rank + 1) * per)
        first = rank // (tp // heads)
        return range(first, first + 1)

    def holders(self, tp: int, segment: int, head: int) -> range:
        """The ranks holding ``head`` of ``segment`` (several where it is replicated)."""
        heads = self.segments[segment].num_heads
        if tp <= heads:
            owner = head // (heads // tp)
            return range(owner, owner + 1)
        copies = tp // heads
        return range(head * copies, (head + 1) * copies)

    def offset(self, tp: int, rank: int, segment: int, head: int) -> int:
        """Where ``head`` of ``segment`` starts in ``rank``'s shard."""
        start = sum(self.heads_per_rank(tp, s) * seg.head_size for s, seg in enumerate(self.segments[:segment]))
        return start + (head - self.held_heads(tp, rank, segment).start) * self.segments[segment].head_size


def transfer_plan(axis: ShardedAxis, source_tp: int, target_tp: int) -> list[Piece]:
    """The pieces that carry ``axis`` from ``source_tp`` prefill ranks to ``target_tp``
    decode ranks, by target then position in its shard (contiguous runs merged)."""
    axis.check(source_tp)
    axis.check(target_tp)
    pieces: list[Piece] = []
    for target in range(target_tp):
        for s, seg in enumerate(axis.segments):
            for head in axis.held_heads(target_tp, target, s):
                replicas = axis.holders(source_tp, s, head)
                source = replicas[target % len(replicas)]
                piece = Piece(source, target, axis.offset(source_tp, source, s, head),
                              axis.offset(target_tp, target, s, head), seg.head_size)
                last = pieces[-1] if pieces else None
                if (last is not None and (last.source, last.target) == (source, target)
                        and last.source_start + last.length == piece.source_start
                        and last.target_start + last.length == piece.target_start):
                    pieces[-1] = Piece(source, target, last.source_start, last.target_start,
                                       last.length + piece.length)
                else:
                    pieces.append(piece)
    return pieces


def sends_of(pieces: list[Piece], source: int) -> list[Piece]:
    """What prefill rank ``source`` sends (to every decode rank)."""
    return [p for p in pieces if p.source == source]


def receives_of(pieces: list[Piece], target: int) -> list[Piece]:
    """What decode rank ``target`` receives (from every prefill rank)."""
    return [p for p in pieces if p.target == target]

"""PyTorch's CUDA caching allocator, replayed: what ``torch.cuda.max_memory_reserved`` becomes
for a sequence of allocations and frees.

The rules are those of ``c10/cuda/CUDACachingAllocator.cpp`` (PyTorch 2.4-2.13), defaults
unchanged (no ``max_split_size_mb``, no ``roundup_power2_divisions``, no garbage collection):

- every request is rounded up to a multiple of 512 bytes (``kMinBlockSize``, ``round_size``);
- requests of at most 1 MiB (``kSmallSize``) come from the small pool, larger ones from the
  large pool; each pool keeps a separate set of free blocks **per stream** -- a block freed on
  one stream is never handed to another (``BlockComparatorSize`` orders by stream first);
- a request takes the smallest free block of its stream and pool that fits, the lowest address
  among equals (``get_free_block``: ``lower_bound`` on (stream, size, address));
- when none fits, a new segment is ``cudaMalloc``'d (``get_allocation_size``): 2 MiB for small
  requests, 20 MiB (``kLargeBuffer``) for requests under 10 MiB (``kMinLargeAlloc``), the
  request rounded up to 2 MiB (``kRoundLarge``) otherwise;
- the block found is split when what remains is at least 512 bytes (small pool) or more than
  1 MiB (large pool) (``should_split``); otherwise the whole block is handed out;
- a freed block merges with free neighbours of its own segment (``free_block``,
  ``try_merge_blocks``); segments are never returned to CUDA, except when ``cudaMalloc`` fails:
  then every cached segment with no block in use is released and the allocation retried
  (``release_cached_blocks``), and if that fails too it is an out-of-memory error.

With ``expandable_segments:True`` (``PYTORCH_CUDA_ALLOC_CONF``; Note [Expandable Segments] in
the same file) each stream's pool is one segment of virtual address space whose physical memory
is mapped in pages of 2 MiB (small pool) or 20 MiB (large pool) as the end of the segment is
needed; any remainder of at least 512 bytes is split off; on out-of-memory, whole free pages are
unmapped. Reserved memory is what is mapped.

Pure arithmetic: the profiler records allocation traces (``profiler/alloc_trace.py``) and the
planner's fast rule for reserved memory was derived from replays of them.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from dataclasses import dataclass, field
from typing import Iterable

from pydantic import BaseModel, ConfigDict, Field

MIN_BLOCK = 512  # kMinBlockSize
SMALL_SIZE = 1 << 20  # kSmallSize: largest small request
SMALL_BUFFER = 2 << 20  # kSmallBuffer: a small-pool segment
LARGE_BUFFER = 20 << 20  # kLargeBuffer: segment for requests of 1-10 MiB; expandable page (large pool)
MIN_LARGE_ALLOC = 10 << 20  # kMinLargeAlloc
ROUND_LARGE = 2 << 20  # kRoundLarge


class AllocatorOutOfMemory(Exception):
    """The replayed device ran out of memory (``capacity`` bytes, segments released first)."""


def round_size(size: int) -> int:
    """``round_size``: at least 512 bytes, a multiple of 512."""
    return MIN_BLOCK if size < MIN_BLOCK else -(-size // MIN_BLOCK) * MIN_BLOCK


def allocation_size(size: int) -> int:
    """``get_allocation_size``: the segment ``cudaMalloc``'d for a (rounded) request."""
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return -(-size // ROUND_LARGE) * ROUND_LARGE


@dataclass(eq=False)
class _Block:
    stream: object
    small: bool
    addr: int
    size: int
    allocated: bool = False
    mapped: bool = True  # expandable segments: the unmapped tail of the address space
    prev: _Block | None = None
    next: _Block | None = None

    def key(self) -> tuple[int, int, int]:
        return (self.size, self.addr, id(self))


@dataclass
class _Pool:
    """Free blocks of one (stream, small/large) pool, ordered by (size, address)."""

    free: list = field(default_factory=list)  # sorted keys
    blocks: dict = field(default_factory=dict)  # key -> block

    def add(self, block: _Block) -> None:
        key = block.key()
        insort(self.free, key)
        self.blocks[key] = block

    def remove(self, block: _Block) -> None:
        key = block.key()
        del self.free[bisect_left(self.free, key)]
        del self.blocks[key]

    def best_fit(self, size: int) -> _Block | None:
        i = bisect_left(self.free, (size, -1, -1))
        return self.blocks[self.free[i]] if i < len(self.free) else None


class CachingAllocator:
    """One device's caching allocator. ``malloc(size, stream)`` returns a handle for ``free``;
    ``allocated``/``reserved`` and their peaks are bytes as ``torch.cuda.memory_stats`` counts
    them (block sizes, i.e. after rounding)."""

    def __init__(self, expandable_segments: bool = False, capacity: int | None = None):
        self.expandable = expandable_segments
        self.capacity = capacity
        self.pools: dict[tuple[object, bool], _Pool] = {}
        self.allocated = self.reserved = 0
        self.peak_allocated = self.peak_reserved = 0
        self.segments = 0  # cudaMalloc calls (or page mappings)
        self.reserved_by_stream: dict[object, int] = {}
        self._next_addr = 1 << 40
        self._tails: dict[tuple[object, bool], _Block] = {}  # expandable: each pool's unmapped tail

    # ------------------------------------------------------------------ public
    def malloc(self, size: int, stream: object = 0) -> _Block:
        size = round_size(size)
        small = size <= SMALL_SIZE
        pool = self.pools.setdefault((stream, small), _Pool())
        block = self._free_block(pool, size)
        if block is None:
            block = self._new_block(stream, small, pool, size)
        else:
            pool.remove(block)
        remaining = block.size - size
        if remaining >= MIN_BLOCK if (small or self.expandable) else remaining > SMALL_SIZE:
            rest = _Block(stream, small, block.addr + size, remaining, prev=block, next=block.next)
            if block.next is not None:
                block.next.prev = rest
            block.next, block.size = rest, size
            pool.add(rest)
        block.allocated = True
        self.allocated += block.size
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        return block

    def free(self, block: _Block) -> None:
        if not block.allocated:
            raise ValueError("double free")
        block.allocated = False
        self.allocated -= block.size
        pool = self.pools[(block.stream, block.small)]
        for neighbour in (block.prev, block.next):
            if neighbour is not None and not neighbour.allocated and neighbour.mapped:
                pool.remove(neighbour)
                self._merge(block, neighbour)
        pool.add(block)

    # ------------------------------------------------------------------ internals
    def _free_block(self, pool: _Pool, size: int) -> _Block | None:
        block = pool.best_fit(size)
        if block is None or not self.expandable or not self._is_tail(block):
            return block
        # expandable: the free block at the end of the mapped range counts as everything it can
        # grow into, so a block that fits without growing is preferred to it (get_free_block)
        i = bisect_left(pool.free, block.key()) + 1
        return pool.blocks[pool.free[i]] if i < len(pool.free) else block

    @staticmethod
    def _is_tail(block: _Block) -> bool:
        return block.next is not None and not block.next.mapped

    @staticmethod
    def _merge(dst: _Block, src: _Block) -> None:
        if src is dst.prev:
            dst.addr, dst.prev = src.addr, src.prev
            if dst.prev is not None:
                dst.prev.next = dst
        else:
            dst.next = src.next
            if dst.next is not None:
                dst.next.prev = dst
        dst.size += src.size

    def _grow(self, stream, nbytes: int) -> bool:
        if self.capacity is not None and self.reserved + nbytes > self.capacity:
            return False
        self.reserved += nbytes
        self.reserved_by_stream[stream] = self.reserved_by_stream.get(stream, 0) + nbytes
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        self.segments += 1
        return True

    def _new_block(self, stream, small: bool, pool: _Pool, size: int) -> _Block:
        for attempt in range(2):
            block = self._expand(stream, small, pool, size) if self.expandable else self._cuda_malloc(
                stream, small, size)
            if block is not None:
                return block
            if attempt == 0:
                self._release_cached()
        raise AllocatorOutOfMemory(f"out of memory allocating {size} bytes with {self.reserved} reserved "
                                   f"and {self.allocated} allocated of {self.capacity}")

    def _cuda_malloc(self, stream, small: bool, size: int) -> _Block | None:
        nbytes = allocation_size(size)
        if not self._grow(stream, nbytes):
            return None
        block = _Block(stream, small, self._next_addr, nbytes)
        self._next_addr += nbytes
        return block

    def _expand(self, stream, small: bool, pool: _Pool, size: int) -> _Block | None:
        """Map pages at the end of the pool's segment: the free block before the unmapped tail
        (if any) and as many new pages as the request still needs."""
        page = SMALL_BUFFER if small else LARGE_BUFFER
        tail = self._tails.get((stream, small))
        if tail is None:
            tail = _Block(stream, small, self._next_addr, 1 << 50, mapped=False)
            self._next_addr += 1 << 51
            self._tails[(stream, small)] = tail
        last = tail.prev if tail.prev is not None and not tail.prev.allocated else None
        have = last.size if last is not None else 0
        pages = -(-(size - have) // page)
        if not self._grow(stream, pages * page):
            return None
        if last is not None:
            pool.remove(last)
            last.size += pages * page
            block = last
        else:
            block = _Block(stream, small, tail.addr, pages * page, prev=tail.prev, next=tail)
            if tail.prev is not None:
                tail.prev.next = block
            tail.prev = block
        tail.addr += pages * page
        return block

    def _release_cached(self) -> None:
        """Out of memory: give back every cached segment with nothing in use (and, with
        expandable segments, every whole free page) (``release_cached_blocks``)."""
        for (stream, small), pool in self.pools.items():
            for key in list(pool.free):
                block = pool.blocks[key]
                if self.expandable:
                    page = SMALL_BUFFER if small else LARGE_BUFFER
                    if self._is_tail(block):  # whole pages at the end of the mapped range
                        pages = block.size // page
                        if pages:
                            pool.remove(block)
                            block.size -= pages * page
                            block.next.addr -= pages * page
                            self.reserved -= pages * page
                            self.reserved_by_stream[stream] -= pages * page
                            if block.size:
                                pool.add(block)
                            else:
                                block.next.prev = block.prev
                                if block.prev is not None:
                                    block.prev.next = block.next
                elif block.prev is None and block.next is None:
                    pool.remove(block)
                    self.reserved -= block.size
                    self.reserved_by_stream[stream] -= block.size


@dataclass(frozen=True)
class ReplayResult:
    peak_allocated: int
    peak_reserved: int
    segments: int
    streams: int
    reserved_by_stream: dict


def replay(events: Iterable[tuple], expandable_segments: bool = False, capacity: int | None = None) -> ReplayResult:
    """Replay ``events``: ``("a", id, nbytes, stream)`` allocates, ``("f", id)`` frees; anything
    else (markers) is skipped.
    Raises AllocatorOutOfMemory when ``capacity`` is given and exceeded."""
    allocator = CachingAllocator(expandable_segments, capacity)
    live: dict[int, _Block] = {}
    streams = set()
    for event in events:
        if event[0] == "a":
            _, ident, nbytes, stream = event
            streams.add(stream)
            live[ident] = allocator.malloc(nbytes, stream)
        elif event[0] == "f":
            block = live.pop(event[1], None)
            if block is not None:
                allocator.free(block)
    return ReplayResult(allocator.peak_allocated, allocator.peak_reserved, allocator.segments, len(streams),
                        dict(allocator.reserved_by_stream))


# ---------------------------------------------------------------- the planner's fast rule

GiB = 1 << 30


@dataclass(frozen=True)
class CacheInputs:
    """What the caching allocator holds beyond a step's allocated peak depends on, as the
    planner knows it for one rank (planner/memory.py fills it in)."""

    checkpointed: bool  # full, op-level or layer:N recompute (the loss's logits then dominate the cache)
    layer_saved: int  # one layer's saved activations, one micro-batch: the blocks every layer frees and reallocates
    logits: int  # the loss's fp32 logits of one micro-batch
    fsdp_unit: int  # FSDP2: the largest unit as gathered (its unsharded parameters, gradients, reduce-scatter input)
    tp_embedding_gradient: int  # tensor parallel without FSDP: the vocabulary-parallel embedding's replicated gradient
    side_pools: int  # FSDP2's all-gather and reduce-scatter streams' own pools, beyond what the peak holds of them


class CacheModel(BaseModel):
    """Reserved minus allocated memory at a step's peak (what ``max_memory_reserved`` adds to
    ``max_memory_allocated``): FSDP2's side-stream pools as they are (all-gather: the three
    largest units as gathered -- two in flight, the third a block of another size; reduce-scatter:
    the sharded gradients and one unit's shard), plus a linear term in the quantities that
    fragment the default stream's pool, fitted to replays (``validation/allocator.py derive``):
    without recompute, one layer's saved activations, FSDP2's unit and the replicated embedding
    gradient of a vocabulary-parallel embedding; with recompute, the loss's fp32 logits. Each
    constant was lifted until no fitted replay is more than 0.5% above its prediction."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    layer_saved: float = Field(ge=0, le=100)
    fsdp_unit: float = Field(ge=0, le=100)
    tp_embedding_gradient: float = Field(ge=0, le=100)
    constant_gib: float = Field(ge=0, le=1e4)
    checkpointed_logits: float = Field(ge=0, le=100)
    checkpointed_constant_gib: float = Field(ge=0, le=1e4)
    source: str = ""

    def cache_bytes(self, x: CacheInputs) -> int:
        if x.checkpointed:
            fragments = self.checkpointed_logits * x.logits + self.checkpointed_constant_gib * GiB
        else:
            fragments = (self.layer_saved * x.layer_saved + self.fsdp_unit * x.fsdp_unit
                         + self.tp_embedding_gradient * x.tp_embedding_gradient + self.constant_gib * GiB)
        return int(x.side_pools + max(0.0, fragments))

"""The batch layout: how a global batch splits over ranks and forward chunks.

Worked out once per run (rskdist/startup.py) and handed to what needs it: the training
stream (classes per rank), the DeepSpeed config (chunks are its accumulation steps), the
memory estimate (rskdist/planning/memory.py) and the checkpoint, which records it so
that a resume on another world size can say what changed (rskdist/parallel/reshard.py).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BatchLayout:
    """`global_batch` images of `m` per class over `world_size` ranks, each rank's share
    forwarded `chunk_size` images at a time (the two-pass step's unit of activation memory)."""

    global_batch: int
    world_size: int
    m: int
    chunk_size: int

    def __post_init__(self):
        if min(self.global_batch, self.world_size, self.m, self.chunk_size) < 1:
            raise ValueError(f"batch layout: data.global_batch, data.m, data.chunk_size and the world size must be "
                             f">= 1, got {self.global_batch}, {self.m}, {self.chunk_size} and {self.world_size}")
        if self.global_batch % (self.world_size * self.m):
            raise ValueError(
                f"config: data.global_batch={self.global_batch} cannot be split over {self.world_size} ranks with "
                f"data.m={self.m} images per class (local batch {self.global_batch / self.world_size:g} must be a "
                f"whole multiple of m); use a global batch that is a multiple of {self.world_size * self.m}"
            )

    @property
    def local_batch(self) -> int:
        """Images per rank per step."""
        return self.global_batch // self.world_size

    @property
    def classes_per_rank(self) -> int:
        return self.local_batch // self.m

    @property
    def num_chunks(self) -> int:
        """Chunks per rank per step: DeepSpeed's gradient accumulation steps."""
        return -(-self.local_batch // self.chunk_size)

    def chunk_starts(self) -> set[int]:
        """Places in the global batch where a forward chunk starts (each chunk's dropout and
        drop-path draws are keyed by it, rskdist/parallel/step.py `chunk_seed`)."""
        return {r * self.local_batch + c for r in range(self.world_size)
                for c in range(0, self.local_batch, self.chunk_size)}

    def record(self) -> dict:
        """What a checkpoint keeps of the layout (plain numbers; `from_record` reads it)."""
        return {"world_size": self.world_size, "global_batch": self.global_batch, "local_batch": self.local_batch,
                "m": self.m, "chunk_size": self.chunk_size, "num_chunks": self.num_chunks}

    @classmethod
    def from_record(cls, record: dict, *, m: int) -> "BatchLayout":
        """The layout of a checkpoint's record; `m` for records saved before they held it."""
        return cls(global_batch=int(record["global_batch"]), world_size=int(record["world_size"]),
                   m=int(record.get("m", m)), chunk_size=int(record["chunk_size"]))

    def describe(self) -> str:
        """The start-up line's account of the batch."""
        return (f"global batch {self.global_batch} ({self.classes_per_rank * self.world_size} classes x {self.m}) | "
                f"local {self.local_batch} in {self.num_chunks} chunks")

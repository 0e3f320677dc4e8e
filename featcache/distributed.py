"""Scale-out under torchrun: N processes extract disjoint shard ranges into one store.

torchrun sets WORLD_SIZE / RANK / LOCAL_RANK; a plain run is a world of one and touches no
torch.distributed at all. Coordination uses gloo (CPU tensors), whatever device the backbone runs on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    _group: Any = None
    _owns_init: bool = field(default=False, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def broadcast(self, value: T) -> T:
        """Rank 0's `value` on every rank."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0, group=self._group)
        return box[0]

    def all_ok(self, ok: bool) -> bool:
        """True on every rank when `ok` is True on every rank (a barrier that carries failure)."""
        if self.world == 1:
            return ok
        import torch
        import torch.distributed as dist

        flag = torch.tensor([0 if ok else 1], dtype=torch.int64)
        dist.all_reduce(flag, group=self._group)
        return int(flag.item()) == 0

    def device(self, device: str) -> str:
        """One GPU per process: 'auto' or 'cuda' becomes cuda:LOCAL_RANK under torchrun."""
        import torch

        if self.world > 1 and device in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return device

    def share(self, items: list[T]) -> list[T]:
        """This rank's contiguous block of `items`; the blocks of all ranks are disjoint and cover all."""
        n = len(items)
        lo, hi = self.rank * n // self.world, (self.rank + 1) * n // self.world
        return items[lo:hi]

    def close(self) -> None:
        if self._owns_init:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._owns_init = False


def world_size() -> int:
    """How many processes torchrun started for this job (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def context() -> Context:
    """The distributed context of this process (a world of one outside torchrun)."""
    world = world_size()
    if world <= 1:
        return Context()
    import torch.distributed as dist

    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("gloo")
        group = None
    else:
        group = dist.new_group(backend="gloo")  # the caller's group may be nccl; objects need gloo
    return Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), group, owns)

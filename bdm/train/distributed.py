"""DDP under torchrun: NCCL on GPUs, gloo on CPU; rank 0 alone writes files.

Multi-node: run the same command on every node, e.g.
`torchrun --nnodes 2 --node_rank R --nproc_per_node 8 --master_addr HOST0 --master_port 29500 -m bdm.train …`
(every node needs the backbone, encoder and data at the same paths; `--output` on rank 0's node).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64,
                         device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return t.tolist()

    def map_split(self, fn, items: list) -> list:
        """[fn(x) for x in items], each rank computing every world-th item (e.g. reading image headers
        once in all, not once per rank), the results gathered on every rank in order."""
        mine = [fn(x) for x in items[self.rank::self.world]]
        if not self.enabled:
            return mine
        parts = [None] * self.world
        dist.all_gather_object(parts, mine)
        out = [None] * len(items)
        for rank, part in enumerate(parts):
            out[rank::self.world] = part
        return out

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def setup(device: str | None) -> Dist:
    """Join the process group torchrun describes in the environment (or run alone)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local if world > 1 else torch.cuda.current_device())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return Dist(rank, world, local, dev)

"""A process's place among the ranks of a data-parallel stage (see parallel.py) and what a rank needs
to train on its share of a batch."""

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Ranks:
    """This process's place in a data-parallel stage: rank `rank` of `size`, collectives on `device`.

    supervised: started by `supervise`, which holds the checkpoint-folder lock, with a process group.
    The default, one unsupervised rank, is the ordinary single-process training, where every method
    returns its input."""

    rank: int = 0
    size: int = 1
    supervised: bool = False
    device: str = "cpu"

    @property
    def main(self) -> bool:
        """Rank 0, which writes the files."""
        return self.rank == 0

    def shard(self, batch: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """This rank's rows of every tensor of a batch: contiguous, the first rows % size ranks one row more
        (torch.tensor_split)."""
        if self.size == 1:
            return tuple(batch)
        return tuple(tensor.tensor_split(self.size)[self.rank] for tensor in batch)

    def weight(self, shard_rows: int, batch_rows: int) -> float:
        """The factor on a shard's mean loss that makes the ranks' average the whole batch's mean (1 for one rank)."""
        return shard_rows * self.size / batch_rows

    def sum(self, values: Sequence[float]) -> list[float]:
        """Each of `values` summed over the ranks, in float64."""
        if not self.supervised:
            return list(values)
        total = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return total.tolist()

    def check_identical(self, module: nn.Module) -> None:
        """RuntimeError when another rank holds other parameters or buffers of `module` (sha256) than rank 0."""
        if not (self.supervised and self.size > 1):
            return
        digest = hashlib.sha256()
        for name, tensor in module.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
        digests: list[Any] = [None] * self.size
        dist.all_gather_object(digests, digest.hexdigest())
        differing = [rank for rank, d in enumerate(digests) if d != digests[0]]
        if differing:
            raise RuntimeError(f"ranks {differing} hold other weights than rank 0 (sha256 {digests[0][:12]}): "
                               "data-parallel training lost its determinism")


class ShardLoss(nn.Module):
    """A model's loss(*batch) as the forward of a module, which DistributedDataParallel needs. A rank whose
    share of a short last batch is empty gives a zero that still reaches every trainable weight."""

    model: Any  # a module with loss(*batch) -> scalar tensor

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *shard: torch.Tensor) -> torch.Tensor:
        if len(shard[0]) == 0:
            return torch.stack([p.sum() for p in self.model.parameters() if p.requires_grad]).sum() * 0.0
        return self.model.loss(*shard)


ONE_PROCESS = Ranks()  # ordinary single-process training

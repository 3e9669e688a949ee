"""Every random draw comes from a generator seeded by the run's `seed` and a purpose."""

import zlib

import numpy as np
import torch


def derived_seed(seed: int, *purpose: object) -> int:
    """A 63-bit seed from the run seed and a purpose such as ("stage_0", "epoch", 3)."""
    keys = [zlib.crc32(str(p).encode()) for p in purpose]
    return int(np.random.SeedSequence([seed, *keys]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def generator(seed: int, *purpose: object, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch.Generator on `device` seeded with derived_seed(seed, *purpose)."""
    return torch.Generator(device).manual_seed(derived_seed(seed, *purpose))

"""The row-owner hash shared bit for bit by the CPU reference and the CUDA kernel.

Embedding-gradient rows are Zipf distributed: a few indices (frequent tokens) are
touched by every rank and most are rare. Assigning rows by ``index % world_size``
or by contiguous ranges puts the hot, clustered low indices on few ranks; a
well-mixed 64-bit hash (the splitmix64 finaliser) spreads them evenly, which is
the load-balancing idea of ZEN (OSDI 2023).
"""

from __future__ import annotations

import numpy as np
import torch

# splitmix64 constants (Steele, Lea, Flood 2014); the CUDA source is generated from
# these same numbers so the two implementations cannot drift apart.
GOLDEN_GAMMA = 0x9E3779B97F4A7C15
SEED_MULTIPLIER = 0xD1B54A32D192ED03
MIX_MULTIPLIER_1 = 0xBF58476D1CE4E5B9
MIX_MULTIPLIER_2 = 0x94D049BB133111EB
MIX_SHIFTS = (30, 27, 31)
UINT64_MASK = (1 << 64) - 1


def seed_offset(seed: int) -> int:
    """The 64-bit word that ``seed`` contributes to every hashed index."""
    if not 0 <= seed <= UINT64_MASK:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return (seed * SEED_MULTIPLIER) & UINT64_MASK


def mix64_python(index: int, seed: int = 0) -> int:
    """Pure-Python hash of one index: the executable specification the array versions follow."""
    z = ((index ^ seed_offset(seed)) + GOLDEN_GAMMA) & UINT64_MASK
    z = ((z ^ (z >> MIX_SHIFTS[0])) * MIX_MULTIPLIER_1) & UINT64_MASK
    z = ((z ^ (z >> MIX_SHIFTS[1])) * MIX_MULTIPLIER_2) & UINT64_MASK
    return z ^ (z >> MIX_SHIFTS[2])


def owner_ranks(indices: torch.Tensor, world_size: int, seed: int = 0) -> torch.Tensor:
    """Owner rank (int64) of each non-negative row index on the CPU.

    NumPy's uint64 arrays wrap on overflow and shift logically, which is exactly
    the C semantics of the CUDA kernel; torch's int64 shifts are arithmetic.
    """
    z = indices.detach().cpu().numpy().astype(np.uint64)
    z ^= np.uint64(seed_offset(seed))
    z += np.uint64(GOLDEN_GAMMA)
    z ^= z >> np.uint64(MIX_SHIFTS[0])
    z *= np.uint64(MIX_MULTIPLIER_1)
    z ^= z >> np.uint64(MIX_SHIFTS[1])
    z *= np.uint64(MIX_MULTIPLIER_2)
    z ^= z >> np.uint64(MIX_SHIFTS[2])
    return torch.from_numpy((z % np.uint64(world_size)).astype(np.int64))

"""Halton order (Halton-MaskGIT, ICLR 2025, valeoai/Halton-MaskGIT): a quasi-random, low-discrepancy
token order that spreads every step's tokens evenly over the image.

The release builds one mask for the grid: the 2-D Halton sequence with bases 2 (rows) and 3 (columns),
starting at point 1 (the generator's first value is 1/2, 1/3), each point scaled by the grid size and
floored in float32, duplicate cells skipped (first occurrence kept). It then unmasks the cells in that
order. Here the points are the radical inverses of ``1, 2, 3, ...`` (the same sequence), generated
until every cell is covered (the release draws a fixed 10,000 points, which covers grids up to about
64 x 64; on those the two orders are identical), and rows use the grid height, columns its width.

MAR reveals positions from the **tail** of an order, so the Halton sequence is returned reversed: its
first point is the first token predicted. ``roll`` (the release's ``randomize``) rotates each sample's
sequence by a uniform random offset drawn from the sample's own generator.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from marcache.hookspecs import hookimpl
from marcache.plugin import Plugin, register_plugin
from marcache.search_space import Categorical


def radical_inverse(index: int, base: int) -> tuple[int, int]:
    """``index`` mirrored at the radix point in ``base``, as an exact fraction ``(numerator, denominator)``."""
    num, den = 0, 1
    while index:
        index, digit = divmod(index, base)
        num, den = num * base + digit, den * base
    return num, den


@lru_cache(maxsize=64)
def halton_sequence(h: int, w: int) -> tuple[int, ...]:
    """Raster positions of an ``h x w`` grid in Halton order (bases 2 and 3 from point 1, duplicates skipped)."""
    seen: dict[int, None] = {}
    index = 0
    while len(seen) < h * w:
        batch = range(index + 1, index + 1 + max(1024, 4 * h * w))
        index = batch[-1]
        # float32 scaling and floor, as the release computes its mask
        xs = torch.tensor([n / d for n, d in (radical_inverse(i, 2) for i in batch)], dtype=torch.float32)
        ys = torch.tensor([n / d for n, d in (radical_inverse(i, 3) for i in batch)], dtype=torch.float32)
        rows, cols = torch.floor(xs * h).long(), torch.floor(ys * w).long()
        for pos in (rows * w + cols).tolist():
            seen.setdefault(pos, None)
        if index > 10_000 * h * w:  # unreachable: the sequence is dense in the unit square
            raise RuntimeError(f"Halton sequence did not cover the {h}x{w} grid")
    return tuple(seen)


@dataclass
class HaltonOrderConfig:
    roll: bool = False  # rotate each sample's sequence by a random offset (the release's ``randomize``)


@register_plugin
class HaltonOrder(Plugin):
    """The Halton token order, revealed first point first (per-sample roll optional)."""

    name = "halton_order"
    families = frozenset({"order"})
    conflicts = ("gtr_order",)  # one token order per policy
    Config = HaltonOrderConfig
    search_space = {"roll": Categorical((False, True))}
    description = "Halton-MaskGIT order: 2-D Halton sequence (bases 2, 3) over the grid, optional per-sample roll"

    @hookimpl
    def marcache_token_order(self, gen):
        h, w = gen.grid
        sequence = torch.tensor(halton_sequence(h, w), dtype=torch.long)
        orders = []
        for g in gen.generators:
            seq = sequence
            if self.config.roll:
                seq = torch.roll(sequence, int(torch.randint(h * w, (1,), generator=g)), 0)
            orders.append(seq.flip(0))  # MAR reveals from the tail: the first Halton point goes last
        self.engagement["orders"] += gen.batch_size
        return torch.stack(orders).to(gen.device)

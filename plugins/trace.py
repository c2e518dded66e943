"""``--trace``: one PNG per generated image showing, step by step, which tokens were predicted,
recomputed, served from a cache or skipped, coloured by the plugin that owned the decision.

The recorder is an ordinary observer plugin (``marcache_step_end``); rendering uses PIL only.
"""

from __future__ import annotations

import colorsys
import hashlib
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from marcache.hookspecs import hookimpl
from marcache.plugin import Plugin, register_plugin

PREDICTED, RECOMPUTED, CACHED, SKIPPED = 0, 1, 2, 3
KIND_NAMES = ("predicted", "recomputed", "from cache", "skipped")


def plugin_colour(name: str, kind: int) -> tuple[int, int, int]:
    """A stable colour per plugin; the kind sets the lightness (predicted darkest, skipped white)."""
    if kind == SKIPPED:
        return (245, 245, 245)
    hue = int(hashlib.md5(name.encode()).hexdigest()[:6], 16) / 0xFFFFFF
    light = {PREDICTED: 0.35, RECOMPUTED: 0.75, CACHED: 0.55}[kind]
    sat = {PREDICTED: 0.85, RECOMPUTED: 0.45, CACHED: 0.9}[kind]
    r, g, b = colorsys.hls_to_rgb(hue, light, sat)
    return int(r * 255), int(g * 255), int(b * 255)


@register_plugin
class TraceRecorder(Plugin):
    """Records per-step, per-sample token roles (observer; changes nothing)."""

    name = "trace"
    families = frozenset({"accounting"})
    description = "record which tokens each step predicted / recomputed / served from cache (for --trace)"

    def __init__(self, config=None):
        super().__init__(config)
        self.samples: dict[int, list] = {}  # sample id -> [(kinds [L] int8, known [L] bool, owners)]

    @hookimpl
    def marcache_step_end(self, step, record):
        kinds = torch.full(record.predicted.shape, SKIPPED, dtype=torch.int8)
        kinds[record.recomputed.cpu()] = RECOMPUTED
        if record.cached is not None:
            kinds[record.cached.cpu()] = CACHED
        kinds[record.predicted.cpu()] = PREDICTED
        known = ~step.mask.cpu()
        for row, sid in enumerate(step.gen.sample_ids.tolist()):
            self.samples.setdefault(sid, []).append((kinds[row].numpy(), known[row].numpy(), dict(record.owners)))
        self.engagement["steps_recorded"] += 1

    def layout(self, sample_id: int, grid: tuple[int, int], per_row: int = 16) -> dict:
        """Geometry of a sample's trace image: cell size, tile origins per step, legend rows."""
        steps = self.samples[sample_id]
        h, w = grid
        cell = max(2, 48 // max(h, w))
        tile_w, tile_h, gap, legend_h = w * cell, h * cell, 4, 16
        legend = self._legend(steps)
        top = gap + legend_h * (len(legend) + 1)
        origins = []
        for s in range(len(steps)):
            r, c = divmod(s, per_row)
            origins.append((gap + c * (tile_w + gap), top + r * (tile_h + gap + 10) + 10))
        rows = (len(steps) + per_row - 1) // per_row
        size = (max(min(per_row, len(steps)) * (tile_w + gap) + gap, 420), top + rows * (tile_h + gap + 10) + gap)
        return {"cell": cell, "grid": grid, "origins": origins, "legend": legend, "legend_h": legend_h, "gap": gap, "size": size}

    def cell_box(self, sample_id: int, grid: tuple[int, int], step: int, pos: int) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)`` of token ``pos``'s cell in the tile of ``step`` (inclusive)."""
        geo = self.layout(sample_id, grid)
        cell, (ox, oy) = geo["cell"], geo["origins"][step]
        i, j = divmod(pos, grid[1])
        return ox + j * cell, oy + i * cell, ox + j * cell + cell - 1, oy + i * cell + cell - 1

    @staticmethod
    def _owner(kind: int, owners: dict) -> str:
        return owners.get("head" if kind == PREDICTED else "forward", "")

    def _legend(self, steps) -> list[tuple[str, list[int]]]:
        """Per owner, the kinds that actually occur (the legend shows no colour the picture lacks)."""
        seen: dict[str, set] = {}
        for kinds, _, owners in steps:
            for kind in (PREDICTED, RECOMPUTED, CACHED):
                if (kinds == kind).any():
                    seen.setdefault(self._owner(kind, owners), set()).add(kind)
        return [(o, sorted(k)) for o, k in sorted(seen.items()) if o]

    def render(self, sample_id: int, grid: tuple[int, int], path: Path, per_row: int = 16) -> Path:
        """Write the trace of one sample as a PNG: one tile per step, one cell per token."""
        steps = self.samples[sample_id]
        geo = self.layout(sample_id, grid, per_row)
        cell, gap, legend_h = geo["cell"], geo["gap"], geo["legend_h"]
        img = Image.new("RGB", geo["size"], "white")
        draw = ImageDraw.Draw(img)
        for oi, (owner, kinds_seen) in enumerate(geo["legend"]):
            y, x = gap + oi * legend_h, gap
            draw.text((x, y), owner, fill=(0, 0, 0))
            x += 110
            for kind in kinds_seen:
                draw.rectangle([x, y + 2, x + 10, y + 12], fill=plugin_colour(owner, kind))
                draw.text((x + 13, y), KIND_NAMES[kind], fill=(0, 0, 0))
                x += 95
        skipped = any((kinds == SKIPPED).any() for kinds, _, _ in steps)
        note = "dot = token already known before the step" + ("; white = skipped" if skipped else "")
        draw.text((gap, gap + len(geo["legend"]) * legend_h), note, fill=(80, 80, 80))
        for s, (kinds, known, owners) in enumerate(steps):
            ox, oy = geo["origins"][s]
            draw.text((ox, oy - 10), str(s), fill=(90, 90, 90))
            for pos in range(grid[0] * grid[1]):
                i, j = divmod(pos, grid[1])
                kind = int(kinds[pos])
                x0, y0 = ox + j * cell, oy + i * cell
                draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=plugin_colour(self._owner(kind, owners), kind))
                if known[pos] and cell >= 3:
                    draw.point((x0 + cell // 2, y0 + cell // 2), fill=(0, 0, 0))
        path.parent.mkdir(parents=True, exist_ok=True)
        from marcache.fileio import write_image_atomic

        write_image_atomic(path, img)
        return path

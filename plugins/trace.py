"""``--trace``: one PNG per generated image showing, step by step, which tokens were predicted,
recomputed, served from a cache or skipped, coloured by the plugin that owned the decision.

The recorder is an ordinary observer plugin (``marcache_step_end``); rendering uses PIL only.
"""

from __future__ import annotations

import colorsys
import hashlib
from pathlib import Path

import numpy as np
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

    def render(self, sample_id: int, grid: tuple[int, int], path: Path, per_row: int = 16) -> Path:
        steps = self.samples[sample_id]
        h, w = grid
        cell = max(2, 48 // max(h, w))
        tile_w, tile_h, gap, legend_h = w * cell, h * cell, 4, 16
        rows = (len(steps) + per_row - 1) // per_row
        cols = min(per_row, len(steps))
        owners = sorted({o for _, _, own in steps for o in own.values() if o})
        legend_rows = len(owners)
        img = Image.new("RGB", (max(cols * (tile_w + gap) + gap, 420), rows * (tile_h + gap + 10) + gap + legend_h * (legend_rows + 1)), "white")
        draw = ImageDraw.Draw(img)
        y0 = gap
        for oi, owner in enumerate(owners):
            x = gap
            draw.text((x, y0 + oi * legend_h), owner, fill=(0, 0, 0))
            x += 110
            for kind in (PREDICTED, RECOMPUTED, CACHED):
                draw.rectangle([x, y0 + oi * legend_h + 2, x + 10, y0 + oi * legend_h + 12], fill=plugin_colour(owner, kind))
                draw.text((x + 13, y0 + oi * legend_h), KIND_NAMES[kind], fill=(0, 0, 0))
                x += 95
        draw.text((gap, y0 + legend_rows * legend_h), "dot = token already known before the step; white = skipped", fill=(80, 80, 80))
        top = y0 + legend_h * (legend_rows + 1)
        for s, (kinds, known, own) in enumerate(steps):
            r, c = divmod(s, per_row)
            ox, oy = gap + c * (tile_w + gap), top + r * (tile_h + gap + 10)
            draw.text((ox, oy), str(s), fill=(90, 90, 90))
            oy += 10
            for pos in range(h * w):
                i, j = divmod(pos, w)
                kind = int(kinds[pos])
                owner = own.get("head" if kind == PREDICTED else "forward", "")
                x0, y0c = ox + j * cell, oy + i * cell
                draw.rectangle([x0, y0c, x0 + cell - 1, y0c + cell - 1], fill=plugin_colour(owner, kind))
                if known[pos] and cell >= 3:
                    mid = cell // 2
                    draw.point((x0 + mid, y0c + mid), fill=(0, 0, 0))
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path)
        return path

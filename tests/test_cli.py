"""End-to-end CLI: generate writes images, a grid, a report and traces; listing and policy commands."""

import json

import numpy as np
from PIL import Image

from marcache.cli import main
from marcache.plugins.trace import PREDICTED, plugin_colour


def test_generate_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["generate", "--model", "mar_tiny", "--labels", "1,7,3", "--seed", "4", "--batch-size", "2",
               "--out", str(out), "--trace", "--no-progress", "sampler.num_iter=5", "sampler.head_steps=3"])
    assert rc == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == ["00000_class1.png", "00001_class7.png", "00002_class3.png", "grid.png", "report.json",
                     "trace_00000.png", "trace_00001.png", "trace_00002.png"]
    img = np.asarray(Image.open(out / "00001_class7.png"))
    assert img.shape == (16, 16) and img.dtype == np.uint8 and img.std() > 0
    report = json.loads((out / "report.json").read_text())
    assert report["labels"] == [1, 7, 3] and report["num_images"] == 3 and report["num_steps"] == 5
    assert report["policy"]["name"] == "baseline" and report["sampler"]["head_steps"] == 3
    assert len(report["steps"]) == 10  # two batches x five steps
    # one tile per step; every cell of the full-recompute baseline is predicted or recomputed (never
    # "from cache"): colours checked pixel by pixel in tests/test_trace.py
    trace = np.asarray(Image.open(out / "trace_00000.png").convert("RGB"))
    predicted = np.array(plugin_colour("ddpm_head", PREDICTED), dtype=np.uint8)
    # each of the 16 tokens is predicted once (a 12 px cell, never dotted: unknown before), plus the 11 px legend swatch
    assert (trace == predicted).all(axis=-1).sum() == 16 * 12 * 12 + 11 * 11
    assert "wrote 3 images" in capsys.readouterr().out

    # same seed, same images
    again = tmp_path / "again"
    assert main(["generate", "--model", "mar_tiny", "--labels", "1,7,3", "--seed", "4", "--out", str(again),
                 "--no-progress", "sampler.num_iter=5", "sampler.head_steps=3"]) == 0
    for name in files[:3]:
        assert np.array_equal(np.asarray(Image.open(out / name)), np.asarray(Image.open(again / name)))


def test_plugins_and_policy_commands(capsys):
    assert main(["plugins"]) == 0
    listing = capsys.readouterr().out
    for name in ("random_order", "cosine_schedule", "linear_cfg", "constant_cfg", "full_recompute", "ddpm_head"):
        assert name in listing
    assert "marcache_token_order" in listing
    assert main(["policy", "show", "baseline", "sampler.num_iter=12"]) == 0
    assert "num_iter: 12" in capsys.readouterr().out
    assert main(["policy", "validate", "--model", "mar_tiny", "baseline", "sampler.num_iter=3"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.endswith("baseline.yaml: valid (built-ins only); dry run on mar_tiny: 3 steps, 2 samples, 100 head steps per token")

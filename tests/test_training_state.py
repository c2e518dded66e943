"""The committed resumable training state of mar_mnist (training/mar_mnist/) loads safely and fits the model."""

from pathlib import Path

import torch
from safetensors.torch import load_file

from marcache.models.registry import create_model

STATE = Path(__file__).resolve().parents[1] / "training" / "mar_mnist"


def test_training_state_is_resumable_and_small():
    ckpt = torch.load(STATE / "checkpoint-last.pth", map_location="cpu", weights_only=True)
    model = create_model("mar_mnist")
    model.load_state_dict(ckpt["model"])  # strict: the raw weights fit the registered config
    model.load_state_dict(load_file(str(STATE / "ema-last.safetensors")))
    assert ckpt["step"] > 0 and {"optimizer", "rng", "args"} <= set(ckpt)
    assert all(p.stat().st_size < 25 * 2**20 for p in STATE.iterdir())

"""`marcache train mnist`: checkpoints load with weights_only=True and --resume continues bit-for-bit."""

import json

import pytest
import torch
from safetensors.torch import load_file

from marcache.cli import main

ARGS = ["train", "mnist", "--batch-size", "8", "--limit-train", "64", "--warmup-steps", "2", "--no-progress",
        "--threads", "1", "--seed", "3"]


def _ckpt(folder):
    return torch.load(folder / "checkpoint-last.pth", map_location="cpu", weights_only=True)


def test_resume_equals_uninterrupted(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(ARGS + ["--out", str(a), "--epochs", "1"]) == 0
    assert main(ARGS + ["--out", str(b), "--epochs", "0.5"]) == 0
    assert _ckpt(b)["step"] == 4
    assert main(ARGS + ["--out", str(b), "--epochs", "1", "--resume"]) == 0
    ca, cb = _ckpt(a), _ckpt(b)
    assert ca["step"] == cb["step"] == 8
    for key in ("model", "model_ema"):
        for name, tensor in ca[key].items():
            assert torch.equal(tensor, cb[key][name]), (key, name)
    # the EMA moved away from the initial weights and the exported safetensors equals the checkpoint's EMA
    ema = load_file(str(a / "ema-last.safetensors"))
    assert all(torch.equal(ema[k], ca["model_ema"][k]) for k in ema)
    assert not torch.equal(ca["model_ema"]["z_proj.weight"], ca["model"]["z_proj.weight"])
    losses = [json.loads(line)["loss"] for line in (a / "log.jsonl").read_text().splitlines()]
    assert all(l == l and l > 0 for l in losses)  # finite, positive


@pytest.mark.parametrize("extra, message", [
    (["--resume"], "does not exist"),
    (["--batch-size", "0"], "must be > 0"),
    (["--model", "nope"], "unknown model"),
])
def test_bad_input_one_line(tmp_path, capsys, extra, message):
    rc = main(ARGS + ["--out", str(tmp_path / "r"), "--epochs", "1"] + extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0]


def test_refuses_to_overwrite_without_resume(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(ARGS + ["--out", str(out), "--epochs", "0.25"]) == 0
    rc = main(ARGS + ["--out", str(out), "--epochs", "0.25"])
    assert rc == 2 and "--resume" in capsys.readouterr().err

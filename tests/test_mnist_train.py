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
    assert "model_ema" not in ca  # the EMA lives only in ema-last.safetensors (each file < 25 MB)
    ema_a, ema_b = load_file(str(a / "ema-last.safetensors")), load_file(str(b / "ema-last.safetensors"))
    for name, tensor in ca["model"].items():
        assert torch.equal(tensor, cb["model"][name]), name
        assert torch.equal(ema_a[name], ema_b[name]), name
    assert not torch.equal(ema_a["z_proj.weight"], ca["model"]["z_proj.weight"])  # the EMA lags the raw weights
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


def test_cosine_schedule_and_init(tmp_path):
    from types import SimpleNamespace

    from marcache.train import learning_rate

    args = SimpleNamespace(lr=1e-3, min_lr=1e-5, warmup_steps=10, lr_schedule="cosine")
    lrs = [learning_rate(s, 100, args) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # non-increasing after warm-up
    assert learning_rate(100, 100, args) == pytest.approx(1e-5)
    # --init: a new run starts from the given weights (raw and EMA)
    a = tmp_path / "a"
    assert main(ARGS + ["--out", str(a), "--epochs", "0.25"]) == 0
    b = tmp_path / "b"
    assert main(ARGS + ["--out", str(b), "--epochs", "0.125", "--init", str(a / "ema-last.safetensors"),
                        "--lr-schedule", "cosine", "--lr", "1e-9"]) == 0
    ema_a, ema_b = load_file(str(a / "ema-last.safetensors")), load_file(str(b / "ema-last.safetensors"))
    assert all(torch.allclose(ema_a[k], ema_b[k], atol=1e-6) for k in ema_a)  # lr ~0: weights kept


def test_bf16_autocast_trains_float32_weights(tmp_path):
    out = tmp_path / "bf16"
    assert main(ARGS + ["--out", str(out), "--epochs", "0.25", "--autocast", "bf16"]) == 0
    ckpt = _ckpt(out)
    assert ckpt["step"] == 2 and json.loads(ckpt["args"])["autocast"] == "bf16"
    assert all(t.dtype == torch.float32 for t in ckpt["model"].values() if t.is_floating_point())
    plain = tmp_path / "fp32"
    assert main(ARGS + ["--out", str(plain), "--epochs", "0.25"]) == 0
    # the same data and seed in another arithmetic: a close but different loss
    loss_bf16, loss_fp32 = (json.loads((o / "log.jsonl").read_text().splitlines()[-1])["loss"] for o in (out, plain))
    assert loss_bf16 != loss_fp32 and abs(loss_bf16 - loss_fp32) < 0.01 * loss_fp32

"""Fidelity to a reference policy (`marcache eval --against`): same seeds and labels, per-image PSNR/SSIM
(torchmetrics) and classifier-feature distance; a policy against itself is identical."""

import json

import numpy as np
import pytest

from marcache.cli import main
from marcache.data import load_mnist
from marcache.evaluation.fidelity import compare_images
from marcache.evaluation.runner import evaluate

from conftest import make_tiny


def test_policy_against_itself_is_identical(tiny_model, tmp_path):
    result = evaluate(tiny_model, "baseline", num_samples=6, seed=3, batch_size=3, score=False,
                      out_dir=str(tmp_path / "run"), against="baseline")
    fid = result["fidelity"]
    assert fid["identical_fraction"] == 1.0 and fid["num_samples"] == 6
    assert fid["psnr"]["mean"] == float("inf") and fid["psnr"]["p5"] == float("inf")
    assert fid["ssim"]["median"] == pytest.approx(1.0)
    assert fid["feature_cosine_distance"] is None  # 16x16 images: no MNIST classifier features
    assert (tmp_path / "run" / "against" / "manifest.json").is_file()


def test_caching_policy_differs_and_fields_are_finite(tmp_path):
    model = make_tiny(4, seed=2, diffloss_d=6)  # lazymar skips head blocks 1..4
    result = evaluate(model, "lazymar", num_samples=4, seed=0, batch_size=4, score=False, against="baseline",
                      overrides=["sampler.num_iter=8"])
    fid = result["fidelity"]
    assert result["against"]["name"] == "baseline"
    assert result["against"]["sampler"]["num_iter"] == 8  # inherited from the evaluated policy
    assert fid["identical_fraction"] < 1.0
    for metric in ("psnr", "ssim"):
        assert set(fid[metric]) == {"mean", "median", "p5"}
    assert np.isfinite(fid["psnr"]["p5"])  # some images differ (identical ones have PSNR inf)
    assert all(np.isfinite(v) for v in fid["ssim"].values()), fid["ssim"]
    assert -1.0 <= fid["ssim"]["p5"] < 1.0 and fid["ssim"]["p5"] <= fid["ssim"]["median"] <= 1.0


def test_compare_images_on_digits():
    images, _ = load_mnist("test")
    a = images[:50, :, :, None]
    same = compare_images(a, a.copy())
    assert same["feature_cosine_distance"]["mean"] == pytest.approx(0.0, abs=1e-6)
    noisy = np.clip(a.astype(int) + np.random.default_rng(0).integers(-40, 41, a.shape), 0, 255).astype(np.uint8)
    other = compare_images(a, images[50:100, :, :, None])
    near = compare_images(a, noisy)
    # a noisy copy of each digit is far closer than another digit, in every metric
    assert near["psnr"]["median"] > other["psnr"]["median"] + 5
    assert near["ssim"]["median"] > other["ssim"]["median"]
    assert near["feature_cosine_distance"]["median"] < other["feature_cosine_distance"]["median"]
    assert set(other["feature_cosine_distance"]) == {"mean", "median", "p95"}


def test_per_image_values_do_not_depend_on_the_chunk(monkeypatch):
    from marcache.evaluation import fidelity

    images, _ = load_mnist("test")
    a, b = images[:23, :, :, None], images[23:46, :, :, None]
    whole = fidelity.per_image(a, b)
    monkeypatch.setattr(fidelity, "CHUNK", 5)  # 23 images: chunks of 5, 5, 5, 5, 3
    chunked = fidelity.per_image(a, b)
    for name in ("psnr", "ssim", "feature_cosine_distance"):
        assert chunked[name].shape == (23,)
        np.testing.assert_allclose(chunked[name], whole[name], rtol=1e-6, atol=1e-7)


def test_cli_against_json_is_strict(tmp_path, capsys):
    from safetensors.torch import save_file

    model = make_tiny(4, seed=1)
    ckpt = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    rc = main(["eval", "--model", "mar_tiny", "--checkpoint", str(ckpt), "--num-samples", "4", "--batch-size", "4",
               "--generate-only", "--against", "--json", "--no-progress"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
    assert out["fidelity"]["psnr"]["mean"] == "inf" and out["fidelity"]["identical_fraction"] == 1.0


def test_seed_spread_and_tie_verdict():
    from marcache.evaluation.spread import combine_seeds, judge

    base = {"model": "m", "policy": {"name": "p"}, "num_samples": 10}
    results = [dict(base, seed=0, fid=10.0, recall=0.50, class_accuracy=0.9, against_metrics={"fid": 10.5, "recall": 0.65}),
               dict(base, seed=1, fid=12.0, recall=0.52, class_accuracy=0.8, against_metrics={"fid": 11.0, "recall": 0.64})]
    combined = combine_seeds(results)
    assert combined["seeds"] == [0, 1] and combined["fid"] == 11.0 and combined["fid_spread"] == 2.0
    assert combined["fid_per_seed"] == [10.0, 12.0]
    assert combined["class_accuracy_spread"] == pytest.approx(0.1)
    assert combined["comparison"] == {"fid_difference": 0.25, "spread": 2.0, "verdict": "tie"}
    # FID ties, recall drops by far more than its spread (0.02): judged on its own
    assert combined["recall_comparison"]["verdict"] == "worse"
    assert combined["recall_comparison"]["recall_difference"] == pytest.approx(-0.135)
    assert judge(15.0, 10.0, 2.0) == "worse" and judge(5.0, 10.0, 2.0) == "better"
    assert judge(0.99, 0.9, 0.01, higher_is_better=True) == "better" and judge(1.0, 2.0, None) is None


def test_cli_seeds_writes_one_folder_per_seed(tmp_path, capsys):
    from safetensors.torch import save_file

    model = make_tiny(4, seed=1)
    ckpt = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    argv = ["eval", "--model", "mar_tiny", "--checkpoint", str(ckpt), "--num-samples", "2", "--batch-size", "2",
            "--generate-only", "--against", "--no-progress", "--out", str(tmp_path / "run"), "sampler.num_iter=2"]
    assert main(argv + ["--seeds", "0,1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["seeds"] == [0, 1] and len(out["fidelity_per_seed"]) == 2
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["seed-0", "seed-1"]
    assert main(argv + ["--seeds", "3"]) == 2 and "two or more" in capsys.readouterr().err

"""benchmarks/gpu_check.py: its CPU dry run end to end (every part but the CUDA ones), its caps, its
failure reports and its reading of the targets, so that the script is known to work before a GPU is lent."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from marcache.policy import list_shipped_policies

BENCH = Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import gpu_check  # noqa: E402


def test_dry_run_exercises_every_part(tmp_path):
    # a generous budget: the caps are for a GPU machine; a loaded 2-core CPU is slower at everything
    rc = gpu_check.main([str(tmp_path), "--dry-run", "--budget-s", "3000", "--site", str(tmp_path / "site")])
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rc == 0, {name: part.get("error") for name, part in result["parts"].items()}
    assert list(result["parts"]) == ["setup", "tests", "parity", "bench"] and result["ok"] and result["dry_run"]
    assert "cuda" in result["machine"]["backends"]
    tests = result["parts"]["tests"]["runs"][0]
    assert tests["counts"]["skipped"] >= 4 and "passed" not in tests["counts"], "the CUDA tests were collected and skipped"
    checks = result["parts"]["parity"]["report"]["checks"]
    parity = {(c["policy"], c["dtype"]) for c in checks if c["check"] == "parity" and c["ok"]}
    assert parity == {(p, d) for p in list_shipped_policies() for d in ("float32", "bfloat16")}
    assert all(c["rel_err"] == 0.0 for c in checks if c["check"] == "parity"), "on CPU the cuda backend is exact"
    assert [c["ok"] for c in checks if c["check"] == "no_host_sync"] == [None, None], "the sync check needs CUDA"
    bench = result["parts"]["bench"]["report"]
    rows = {(r["row"], r["dtype"]) for r in bench["rows"]}
    policies = gpu_check.BENCH_POLICIES.split(",")
    assert rows == {(label, d) for d in ("float32", "bfloat16")
                    for label in ["official"] + [f"{p}/{b}" for p in policies for b in ("reference", "cuda")]}
    assert all(r["seconds"] > 0 and r["batch"] == 2 for r in bench["rows"])
    assert any(t["target"].startswith("turbo cuda/reference") for t in result["targets"])
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| bench | pass |" in table and "| parity | turbo | bfloat16 | 0.00e+00 | 5e-02 | yes |" in table
    assert "| 2 | turbo/cuda | bfloat16 |" in table
    assert "[bench] batch   2" in (tmp_path / "gpu_check.log").read_text()


def test_missing_packages_without_wheels_stop_at_setup(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "REQUIRED", [*gpu_check.REQUIRED, "no_such_module_xyz"])
    rc = gpu_check.main([str(tmp_path / "out"), "--dry-run", "--wheels", str(tmp_path / "empty"), "--site", str(tmp_path / "site")])
    result = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert rc == 1 and not result["ok"]
    assert "missing no_such_module_xyz and no wheels in" in result["parts"]["setup"]["error"]
    assert "fetch_gpu_wheels.sh" in result["parts"]["setup"]["error"]
    assert all(result["parts"][p]["not_run"] for p in ("tests", "parity", "bench"))
    assert "| setup | FAIL |" in (tmp_path / "out" / "gpu_check.md").read_text()


def test_a_part_past_its_cap_is_killed_with_its_children(tmp_path):
    log = gpu_check.Log(tmp_path / "log")
    child = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); print('up', flush=True); time.sleep(60)"
    start = time.monotonic()
    rc, lines = gpu_check.run_capped([sys.executable, "-c", child], 3, dict(), log, "slow")
    assert rc is None and lines == ["up"] and time.monotonic() - start < 20
    assert "killed at its cap of 3 s" in (tmp_path / "log").read_text()


def test_targets_are_read_off_the_benchmark_rows():
    def row(batch, label, seconds, dtype="float16"):
        return {"batch": batch, "row": label, "dtype": dtype, "seconds": seconds, "speedup_vs_official": 6.0 / seconds}

    bench = {"rows": [row(16, "official", 6.0), row(16, "baseline/reference", 5.0), row(16, "baseline/cuda", 1.5),
                      row(16, "turbo/reference", 2.0), row(16, "turbo/cuda", 0.5), row(64, "official", 6.0),
                      row(64, "turbo/cuda", 3.0), row(16, "official", 6.0, "bfloat16"), row(16, "baseline/cuda", 3.0, "bfloat16")]}
    found = {t["target"]: (t["value"], t["met"]) for t in gpu_check.targets(bench)}
    assert found["baseline/cuda >= 3x official at batch 16 (float16)"] == ("4.00x", True)
    assert found["turbo/cuda vs official at batch 16 (float16)"] == ("12.00x", None)
    assert found["turbo/cuda vs official at batch 64 (float16)"] == ("2.00x", None)
    assert found["turbo cuda/reference speed at batch 16 (float16)"] == ("4.00x", None)
    assert found["baseline cuda/reference speed at batch 16 (float16)"] == ("3.33x", None)
    assert not any("64 (float16)" in t and "cuda/reference" in t for t in found), "no reference row at 64: no ratio"
    bench["rows"][2] = row(16, "baseline/cuda", 2.5)
    assert gpu_check.targets(bench)[0]["met"] is False


@pytest.mark.parametrize("argv, message", [(["out", "--parts", "setup,gpu"], "--parts: unknown ['gpu']"),
                                           (["out", "--num-iter", "0"], "must be positive")])
def test_bad_arguments_exit_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        gpu_check.parse_args(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_wheel_script_refuses_bad_arguments_before_any_download(tmp_path):
    script = BENCH / "fetch_gpu_wheels.sh"
    for args, message in ((["--python-version", "three"], "is not X.Y"), (["--frobnicate"], "unknown argument")):
        proc = subprocess.run(["bash", str(script), *args, "--dest", str(tmp_path / "w")], capture_output=True, text=True)
        assert proc.returncode == 2 and message in proc.stderr and proc.stderr.count("\n") == 1
        assert not (tmp_path / "w").exists()

"""`torchrun --nproc_per_node=2` (gloo) evaluation generates exactly the images of the 1-process run."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from marcache.evaluation import sharded
from marcache.models.registry import create_model

from conftest import perturb

N, SHARD, BS = 24, 5, 4


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = perturb(create_model("mar_tiny"), seed=2)
    path = tmp_path_factory.mktemp("dist") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _eval_cmd(ckpt, out, cache):
    return ["-m", "marcache.cli", "eval", "--model", "mar_tiny", "--checkpoint", str(ckpt), "--num-samples", str(N),
            "--shard-size", str(SHARD), "--batch-size", str(BS), "--seed", "7", "--out", str(out), "--threads", "1",
            "--cache-root", str(cache), "--json", "--generate-only", "--no-progress", "sampler.num_iter=4", "sampler.head_steps=8"]


def _run(args, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    proc = subprocess.run([sys.executable] + args, capture_output=True, text=True, env=env, timeout=400, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_two_ranks_equal_one_rank(tiny_ckpt, tmp_path):
    cache = tmp_path / "cache"
    one = _run(_eval_cmd(tiny_ckpt, tmp_path / "one", cache), tmp_path)
    two = _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
               + _eval_cmd(tiny_ckpt, tmp_path / "two", cache), tmp_path)
    r1 = json.loads(one.stdout.strip().splitlines()[-1])
    lines = [line for line in two.stdout.strip().splitlines() if line.startswith("{")]
    assert len(lines) == 1  # only rank 0 reports
    r2 = json.loads(lines[0])
    assert r1["world_size"] == 1 and r2["world_size"] == 2
    a = sharded.collect(tmp_path / "one", N, SHARD)
    b = sharded.collect(tmp_path / "two", N, SHARD)
    assert np.array_equal(a["sample_ids"], np.arange(N)) and np.array_equal(b["sample_ids"], np.arange(N))
    assert np.array_equal(a["images"], b["images"]) and np.array_equal(a["labels"], b["labels"])
    assert a["images"].std() > 0  # real images, not a constant
    assert r1["num_samples"] == r2["num_samples"] == N and "fid" not in r1

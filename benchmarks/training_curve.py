"""Quality against training time: evaluate the EMA weights of a running `marcache train` as they are saved.

    python benchmarks/training_curve.py runs/mnist2 --every-steps 300 --num-samples 1000 --seed 0

Polls ``RUN/ema-last.safetensors``; whenever its step (safetensors metadata) has advanced by at least
``--every-steps`` since the last evaluation, copies it to ``RUN/snapshots/ema-step<N>.safetensors``,
evaluates the baseline policy (``marcache.evaluation.evaluate``) and appends a line to
``RUN/curve.jsonl``: step, epochs, training seconds (from ``log.jsonl``), FID, precision, recall, class
accuracy. Stops after ``--max-minutes``. Run it beside the training, at low priority.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path


def _step(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return int((f.metadata() or {}).get("step", -1))


def _train_seconds(run: Path, step: int):
    seconds = None
    for line in (run / "log.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["step"] <= step:
            seconds, epoch = row["seconds"], row["epoch"]
    return (seconds, epoch) if seconds is not None else (None, None)


def evaluate_snapshot(run: Path, snapshot: Path, step: int, num_samples: int, seed: int, batch_size: int) -> dict:
    import marcache
    from marcache.evaluation import evaluate

    model = marcache.load_mar("mar_mnist", str(snapshot))
    result = evaluate(model, "baseline", num_samples, seed, batch_size)
    seconds, epoch = _train_seconds(run, step)
    row = {"step": step, "epoch": epoch, "train_seconds": seconds, "num_samples": num_samples, "seed": seed,
           **{k: result[k] for k in ("fid", "precision", "recall", "class_accuracy", "inception_score")}}
    with open(run / "curve.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="the training run folder (marcache train --out)")
    p.add_argument("--every-steps", type=int, default=300)
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--poll-seconds", type=float, default=30)
    p.add_argument("--max-minutes", type=float, default=600)
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    ema = args.run / "ema-last.safetensors"
    done = {json.loads(line)["step"] for line in (args.run / "curve.jsonl").read_text().splitlines()} \
        if (args.run / "curve.jsonl").is_file() else set()
    last = max(done, default=-10**9)
    start = time.time()
    while time.time() - start < args.max_minutes * 60:
        if ema.is_file():
            step = _step(ema)
            if step >= last + args.every_steps:
                snapshot = args.run / "snapshots" / f"ema-step{step:06d}.safetensors"
                snapshot.parent.mkdir(exist_ok=True)
                shutil.copyfile(ema, snapshot)
                if _step(snapshot) == step:  # not replaced while copying
                    print(json.dumps(evaluate_snapshot(args.run, snapshot, step, args.num_samples, args.seed,
                                                       args.batch_size)), flush=True)
                    last = step
        time.sleep(args.poll_seconds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

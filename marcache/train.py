"""``marcache train mnist``: the official MAR recipe scaled down to MNIST on a CPU.

Recipe (LTH14/mar ``main_mar.py`` / ``engine_mar.py``, scaled): AdamW (betas 0.9/0.95, weight decay
0.02 on weights, none on biases/norms/embeddings), linear warm-up then constant lr, gradient clipping,
EMA of the weights (with a short warm-up of the decay so that short runs are usable), the masking
ratio drawn from the truncated normal inside :meth:`MAR.forward`, label dropout 0.1 for CFG and
``diffusion_batch_mul`` copies of each token for the head loss. Images are MNIST digits scaled to
[-1, 1] and used as pixel-space "latents" ``[B, 1, 28, 28]`` (no VAE, no flips: digits are not
mirror-symmetric).

A run folder holds ``checkpoint-last.pth`` (raw weights, optimizer, step, RNG states, run arguments;
loads with ``torch.load(weights_only=True)``) and ``ema-last.safetensors`` (the EMA weights, which are
also the weights to ship). The EMA lives only in the safetensors file so that each file of the
resumable state stays under 25 MB (mar_mnist: 22.2 MB + 7.4 MB) and can be committed. ``--resume``
continues bit-for-bit from the data order and RNG state saved in the checkpoint.

``--init FILE`` starts a new run from existing weights (raw and EMA both), e.g. to continue training a
shipped model with a fresh optimizer and another schedule. ``--lr-schedule cosine`` decays the
learning rate from ``--lr`` to ``--min-lr`` over the run after warm-up (``constant`` keeps ``--lr``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import time
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError

CHECKPOINT = "checkpoint-last.pth"
EMA_FILE = "ema-last.safetensors"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a model (mnist: the shipped mar_mnist)")
    p.set_defaults(func=run)
    p.add_argument("dataset", choices=["mnist"], help="data set (only mnist)")
    p.add_argument("--model", default="mar_mnist", help="registered model config (default mar_mnist)")
    p.add_argument("--out", default="runs/mnist", help="run folder (checkpoints, log.jsonl)")
    p.add_argument("--epochs", type=float, default=6.0, help="epochs to train (fractional allowed)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=6e-4, help="peak (constant) learning rate")
    p.add_argument("--warmup-steps", type=int, default=300)
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant",
                   help="after warm-up: constant lr, or cosine decay to --min-lr at the last step")
    p.add_argument("--min-lr", type=float, default=0.0, help="final lr of --lr-schedule cosine")
    p.add_argument("--init", default=None, help="start from these weights (.safetensors state dict), fresh optimizer")
    p.add_argument("--weight-decay", type=float, default=0.02)
    p.add_argument("--grad-clip", type=float, default=3.0)
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay (ramped as min(ema, (1+s)/(10+s)))")
    p.add_argument("--diffusion-batch-mul", type=int, default=2)
    p.add_argument("--autocast", choices=["none", "bf16"], default="none",
                   help="bf16: forward pass under CPU bfloat16 autocast (weights, AdamW and EMA stay float32); "
                        "faster only on CPUs with AMX / AVX512-BF16, see docs/mnist.md")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--save-every-min", type=float, default=5.0, help="checkpoint interval in minutes")
    p.add_argument("--max-minutes", type=float, default=None, help="stop (after saving) after this many minutes")
    p.add_argument("--resume", action="store_true", help=f"continue from OUT/{CHECKPOINT}")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--limit-train", type=int, default=None, help="use only the first N training images (tests)")


def _param_groups(model: torch.nn.Module, weight_decay: float):
    """Official ``add_weight_decay``: no decay on 1-d parameters (biases, norms) and on the null class."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") or name in ("fake_latent",) else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "numpy_pos": int(np_state[2]), "numpy_has_gauss": int(np_state[3]), "numpy_gauss": float(np_state[4])}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))


def _epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    """Data order of an epoch: a function of (seed, epoch) only, so a resumed run sees the same order."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))


def _save(out: Path, model, ema, optimizer, step: int, args_dict: dict, elapsed: float) -> None:
    from safetensors.torch import save_file

    # EMA first: a checkpoint never points at an older EMA than its own step
    tmp = out / (EMA_FILE + ".tmp")
    save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(tmp), metadata={"step": str(step)})
    os.replace(tmp, out / EMA_FILE)
    ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "rng": _rng_state(),
            "args": json.dumps(args_dict), "elapsed_seconds": float(elapsed)}
    tmp = out / (CHECKPOINT + ".tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, out / CHECKPOINT)


def learning_rate(step: int, total_steps: int, args) -> float:
    """Linear warm-up over ``warmup_steps``, then constant or cosine decay to ``min_lr`` at ``total_steps``."""
    warm = max(1, args.warmup_steps)
    if step < warm or args.lr_schedule == "constant":
        return args.lr * min(1.0, (step + 1) / warm)
    progress = min(1.0, (step - warm) / max(1, total_steps - warm))
    return args.min_lr + (args.lr - args.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def train(args: argparse.Namespace) -> dict:
    from tqdm.auto import tqdm

    from .data import load_mnist, to_model_input
    from .models.registry import create_model, model_config

    try:
        model_config(args.model)
    except KeyError as exc:
        raise ConfigError(str(exc.args[0])) from None
    for name in ("batch_size", "epochs", "lr"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be > 0")
    if not 0.0 <= args.ema < 1.0:
        raise ConfigError("--ema must be in [0, 1)")
    if not 0.0 <= args.min_lr <= args.lr:
        raise ConfigError("--min-lr must be in [0, --lr]")
    if args.init is not None and args.resume:
        raise ConfigError("--init starts a new run; --resume continues one: pass only one of them")
    out = Path(args.out)
    ckpt_path = out / CHECKPOINT
    if args.resume and not ckpt_path.is_file():
        raise ConfigError(f"--resume: {ckpt_path} does not exist")
    if not args.resume and ckpt_path.is_file():
        raise ConfigError(f"{ckpt_path} exists: pass --resume to continue it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)

    images, labels = load_mnist("train")
    if args.limit_train:
        images, labels = images[: args.limit_train], labels[: args.limit_train]
    x_all = to_model_input(images)
    y_all = torch.from_numpy(labels)
    n = len(x_all)
    steps_per_epoch = n // args.batch_size
    if steps_per_epoch < 1:
        raise ConfigError(f"--batch-size {args.batch_size} exceeds the {n} training images")
    total_steps = int(math.ceil(args.epochs * steps_per_epoch))

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    model = create_model(args.model, diffusion_batch_mul=args.diffusion_batch_mul)
    ema = create_model(args.model, diffusion_batch_mul=args.diffusion_batch_mul)
    if args.init is not None:
        from .loading import read_state_dict

        try:
            model.load_state_dict(read_state_dict(args.init))
        except RuntimeError as exc:
            raise ConfigError(f"--init {args.init}: does not fit model {args.model!r} ({str(exc).splitlines()[0]})") from None
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False).eval()
    optimizer = torch.optim.AdamW(_param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95))
    args_dict = {k: v for k, v in vars(args).items() if k != "func"}
    step, elapsed0 = 0, 0.0
    if args.resume:
        from safetensors.torch import load_file

        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["model_ema"] if "model_ema" in ckpt else load_file(str(out / EMA_FILE)))
        optimizer.load_state_dict(ckpt["optimizer"])
        step = int(ckpt["step"])
        elapsed0 = float(ckpt.get("elapsed_seconds", 0.0))
        _set_rng_state(ckpt["rng"])
        saved = json.loads(ckpt["args"])
        for key in ("batch_size", "seed", "model", "limit_train"):
            if saved.get(key) != args_dict.get(key):
                raise ConfigError(f"--resume: --{key.replace('_', '-')} {args_dict.get(key)} differs from the checkpoint's {saved.get(key)}")

    stop = {"flag": False}

    def _on_signal(signum, frame):  # finish the current step, save, exit
        stop["flag"] = True

    old_handlers = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    model.train()
    log = open(out / "log.jsonl", "a")
    start = time.time()
    last_save = start
    losses: list[float] = []
    bar = tqdm(total=total_steps, initial=step, desc="train mnist", disable=args.no_progress, dynamic_ncols=True)
    try:
        perm_epoch, perm = -1, None
        while step < total_steps and not stop["flag"]:
            epoch, pos = divmod(step, steps_per_epoch)
            if epoch != perm_epoch:
                perm, perm_epoch = _epoch_permutation(args.seed, epoch, n), epoch
            idx = perm[pos * args.batch_size: (pos + 1) * args.batch_size]
            lr = learning_rate(step, total_steps, args)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.autocast == "bf16"):
                loss = model(x_all[idx], y_all[idx])
            if not torch.isfinite(loss):
                raise RuntimeError(f"loss is {loss.item()} at step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            step += 1
            decay = min(args.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(pm, 1.0 - decay)
            losses.append(loss.item())
            bar.update(1)
            if step % 25 == 0 or step == total_steps:
                mean = float(np.mean(losses))
                bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.1e}", epoch=f"{step / steps_per_epoch:.2f}")
                log.write(json.dumps({"step": step, "epoch": step / steps_per_epoch, "loss": mean, "lr": lr,
                                      "seconds": elapsed0 + time.time() - start}) + "\n")
                log.flush()
                losses = []
            now = time.time()
            if now - last_save >= args.save_every_min * 60:
                _save(out, model, ema, optimizer, step, args_dict, elapsed0 + now - start)
                last_save = now
            if args.max_minutes is not None and now - start >= args.max_minutes * 60:
                break
        _save(out, model, ema, optimizer, step, args_dict, elapsed0 + time.time() - start)
    finally:
        bar.close()
        log.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
    return {"step": step, "total_steps": total_steps, "epochs": step / steps_per_epoch,
            "seconds": elapsed0 + time.time() - start, "checkpoint": str(ckpt_path), "ema": str(out / EMA_FILE)}


def run(args) -> int:
    info = train(args)
    done = "finished" if info["step"] >= info["total_steps"] else "stopped (resume with --resume)"
    print(f"{done}: step {info['step']}/{info['total_steps']} ({info['epochs']:.2f} epochs, {info['seconds'] / 60:.1f} min); "
          f"checkpoint {info['checkpoint']}, EMA weights {info['ema']}")
    return 0

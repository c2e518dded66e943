"""The MNIST judge: a small CNN whose 128-d penultimate layer is the feature space of FID/KID/PRC
and whose logits give the Inception Score and the class accuracy of conditional samples.

Input: float ``[B, 1, 28, 28]`` in [-1, 1] (the mar_mnist pixel space). Trained by
``python -m marcache.evaluation.classifier`` (a few minutes on a CPU core, >= 99% test accuracy);
the weights ship as ``marcache/weights/mnist_classifier.safetensors``.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn
import torch.nn.functional as F

from ..errors import CheckpointError

FEATURE_DIM = 128


class MnistNet(nn.Module):
    """conv32-pool-conv64-pool-conv64 (BatchNorm, ReLU) -> fc 128 (``features``) -> ReLU -> fc 10 (logits)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(64)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(64)
        self.fc1 = nn.Linear(64 * 7 * 7, FEATURE_DIM)
        self.dropout = nn.Dropout(0.3)
        self.fc2 = nn.Linear(FEATURE_DIM, 10)

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.relu(self.bn3(self.conv3(x)))
        feats = self.fc1(x.flatten(1))  # pre-activation: dense features for the Gaussian fit of FID
        return feats, self.fc2(self.dropout(F.relu(feats)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(x)[1]


def uint8_to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, 28, 28]``, ``[B, H, W, C]`` (HWC, numpy style) or ``[B, C, H, W]`` -> float ``[B, 1, 28, 28]`` in [-1, 1].

    Colour inputs are averaged to grey; other sizes are resized bilinearly to 28x28.
    """
    x = torch.as_tensor(images)
    if x.ndim == 3:
        x = x.unsqueeze(1)
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.permute(0, 3, 1, 2)
    x = x.float()
    if x.shape[1] != 1:
        x = x.mean(dim=1, keepdim=True)
    if x.shape[-2:] != (28, 28):
        x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False, antialias=True)
    return x / 127.5 - 1.0


def weights_digest(path: str | Path) -> str:
    """Short content hash of a weights file (names caches of reference statistics)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


def load_classifier(path: Optional[str | Path] = None) -> MnistNet:
    """The classifier in eval mode; ``path`` defaults to the shipped safetensors."""
    from safetensors.torch import load_file

    from ..weights import classifier_path

    path = Path(path) if path is not None else classifier_path()
    if not path.is_file():
        raise CheckpointError(f"{path}: no such classifier weights file")
    net = MnistNet()
    try:
        net.load_state_dict(load_file(str(path)), strict=True)
    except Exception as exc:  # noqa: BLE001 - one line for any malformed file
        raise CheckpointError(f"{path}: not MNIST classifier weights ({str(exc).splitlines()[0][:160]})") from None
    return net.eval()


@torch.no_grad()
def predict(net: MnistNet, images_uint8, batch_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features [N, 128], logits [N, 10])`` of uint8 images."""
    feats, logits = [], []
    for i in range(0, len(images_uint8), batch_size):
        f, lg = net.features_and_logits(uint8_to_input(images_uint8[i: i + batch_size]))
        feats.append(f)
        logits.append(lg)
    return torch.cat(feats), torch.cat(logits)


def _shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random translation of each image by up to ``max_shift`` pixels (background -1 fills the border)."""
    b = x.shape[0]
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)[:, 0]  # [B, 28 + 2s, 28 + 2s]
    dy = torch.randint(0, 2 * max_shift + 1, (b, 1, 1), generator=gen)
    dx = torch.randint(0, 2 * max_shift + 1, (b, 1, 1), generator=gen)
    rows = (dy + torch.arange(28).view(1, 28, 1)).expand(b, 28, 28)
    cols = (dx + torch.arange(28).view(1, 1, 28)).expand(b, 28, 28)
    flat = padded.reshape(b, -1)
    return flat.gather(1, (rows * padded.shape[-1] + cols).reshape(b, -1)).reshape(b, 1, 28, 28)


def train_classifier(out: str | Path, epochs: int = 3, batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
                     threads: int = 1, log=print) -> dict:
    """Train on the 60k MNIST training images (random shifts), report test accuracy, save safetensors."""
    from safetensors.torch import save_file

    from ..data import load_mnist, to_model_input

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    xtr, ytr = load_mnist("train")
    xte, yte = load_mnist("test")
    xtr, ytr = to_model_input(xtr), torch.from_numpy(ytr)
    net = MnistNet()
    steps = epochs * (len(xtr) // batch_size)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    start = time.time()
    step = 0
    for epoch in range(epochs):
        net.train()
        perm = torch.randperm(len(xtr), generator=gen)
        for i in range(len(xtr) // batch_size):
            idx = perm[i * batch_size: (i + 1) * batch_size]
            loss = F.cross_entropy(net(_shift(xtr[idx], gen)), ytr[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 100 == 0:
                log(f"epoch {epoch} step {step}/{steps} loss {loss.item():.4f} ({time.time() - start:.0f}s)")
        net.eval()
        _, logits = predict(net, xte)
        acc = (logits.argmax(1).numpy() == yte).mean()
        log(f"epoch {epoch}: test accuracy {acc:.4f}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out),
              metadata={"test_accuracy": f"{acc:.4f}", "epochs": str(epochs), "seed": str(seed)})
    return {"test_accuracy": float(acc), "seconds": time.time() - start, "path": str(out)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="train the MNIST evaluation classifier")
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "weights" / "mnist_classifier.safetensors"))
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    info = train_classifier(args.out, epochs=args.epochs, seed=args.seed, threads=args.threads)
    print(info)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

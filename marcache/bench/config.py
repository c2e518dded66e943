"""The configuration of one ``marcache bench`` run: a validated, immutable object (not argparse's
Namespace), so the measuring code reads settings that cannot change under it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from marcache.errors import ConfigError
from marcache.evaluation.spread import parse_seeds

MATCH_MODES = ("ar", "head", "mixed")


def match_modes(text: str) -> tuple[str, ...]:
    """``"ar,head"`` -> ``("ar", "head")``; ``"none"`` -> ``()``."""
    modes = [m.strip() for m in text.split(",") if m.strip()]
    if modes == ["none"]:
        return ()
    bad = [m for m in modes if m not in MATCH_MODES]
    if bad or not modes:
        raise ConfigError(f"--match {text!r}: expected a comma-separated subset of {', '.join(MATCH_MODES)}, or none")
    return tuple(dict.fromkeys(modes))


@dataclass(frozen=True)
class BenchConfig:
    """Everything a bench run needs; construction validates (one-line :class:`ConfigError`).

    ``num_images=None`` means one batch (:attr:`images`); ``match`` is a tuple of
    :data:`MATCH_MODES` (see :func:`match_modes` for the command-line form)."""

    policies: tuple = ()
    model: str = "mar_mnist"
    checkpoint: Optional[str] = None
    weights: str = "model_ema"
    batch_size: int = 64
    num_images: Optional[int] = None
    warmup: int = 1
    repeats: int = 5
    seed: int = 0
    match: tuple = MATCH_MODES
    match_tolerance: float = 0.05
    threads: Optional[int] = None
    eval: bool = False
    eval_samples: int = 1000
    eval_seeds: tuple = (0, 1)
    plot: Optional[str] = None
    out: Optional[str] = None
    json: bool = False
    overrides: tuple = field(default_factory=tuple)

    def __post_init__(self):
        checks = [
            (self.batch_size >= 1, "--batch-size must be >= 1"),
            (self.num_images is None or self.num_images >= 1, "--num-images must be >= 1"),
            (self.repeats >= 1, "--repeats must be >= 1"),
            (self.warmup >= 0, "--warmup must be >= 0"),
            (self.threads is None or self.threads >= 1, "--threads must be >= 1"),
            (self.match_tolerance >= 0, "--match-tolerance must be >= 0"),
            (not self.eval or self.eval_samples >= 1, "--eval-samples must be >= 1"),
            (len(self.eval_seeds) >= 1 and len(set(self.eval_seeds)) == len(self.eval_seeds),
             "--eval-seeds must list distinct seeds, e.g. 0,1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        bad = [m for m in self.match if m not in MATCH_MODES]
        if bad:
            raise ConfigError(f"--match: unknown mode(s) {', '.join(bad)}; use {', '.join(MATCH_MODES)}")
        for item in self.overrides:
            if item.split("=", 1)[0].startswith(("sampler.num_iter", "sampler.head_steps")):
                raise ConfigError(f"override {item!r}: bench sets num_iter/head_steps per row; put them in a policy file")

    @property
    def images(self) -> int:
        """Images per timed run (default: one batch)."""
        return self.num_images if self.num_images is not None else self.batch_size

    @classmethod
    def from_args(cls, args) -> "BenchConfig":
        """From the parsed ``marcache bench`` arguments (``args`` is not modified)."""
        return cls(policies=tuple(args.policy), model=args.model, checkpoint=args.checkpoint, weights=args.weights,
                   batch_size=args.batch_size, num_images=args.num_images, warmup=args.warmup, repeats=args.repeats,
                   seed=args.seed, match=match_modes(args.match), match_tolerance=args.match_tolerance,
                   threads=args.threads, eval=args.eval, eval_samples=args.eval_samples,
                   eval_seeds=parse_seeds(args.eval_seeds, "--eval-seeds"), plot=args.plot, out=args.out,
                   json=args.json, overrides=tuple(args.overrides))


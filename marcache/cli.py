"""The ``marcache`` command line.

Every user error (bad YAML, unknown plugin, bad checkpoint, bad argument) prints one line
``marcache: error: ...`` and exits with status 2; nothing is written before inputs are validated.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Optional, Sequence

from .errors import ConfigError, MarcacheError

#: modules contributing subcommands: each defines ``add_parser(subparsers)``, which adds its parser
#: (built with ``parser_class=_Parser`` semantics) and sets ``func`` to a ``run(args) -> int``.
COMMAND_MODULES: list[str] = ["marcache.flops.command", "marcache.bench.command", "marcache.train", "marcache.evaluation.cli", "marcache.tuning.cli"]


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump) and exit status 2."""

    def error(self, message: str):  # noqa: D401
        raise ConfigError(f"{message} (see `{self.prog} --help`)")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="registered model name (mar_base, mar_large, mar_huge, mar_tiny, ...); default: the shipped mar_mnist")
    p.add_argument("--checkpoint", help="weights: official checkpoint-last.pth, a state dict or .safetensors")
    p.add_argument("--weights", default="model_ema", choices=["model_ema", "model"], help="entry of an official checkpoint (default model_ema)")
    p.add_argument("--vae", help="KL-16 VAE weights (kl16.ckpt / .safetensors) for latent models, or 'random'")


def add_policy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", default="baseline", help="policy YAML file or shipped policy name (default baseline)")
    add_backend_arg(p)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="policy overrides: sampler.num_iter=32, backend.dtype=bfloat16, <plugin>.<param>=v")


def add_backend_arg(p: argparse.ArgumentParser) -> None:
    from marcache.backends import available_backends

    p.add_argument("--backend", choices=["auto", *available_backends()], default=None,
                   help="execution backend (same as the override backend.name=...; default: the policy's, auto = "
                        "cuda on a CUDA device, else reference)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="marcache", description="Faithful, pluggable and accelerated MAR sampling.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    g = sub.add_parser("generate", help="generate images with a policy")
    g.set_defaults(func=cmd_generate)
    add_model_args(g)
    add_policy_args(g)
    g.add_argument("--labels", help="comma-separated class ids (default: 0, 1, 2, ... cycling over classes)")
    g.add_argument("--num-images", type=int, help="number of images (default: one per label, else 16)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--out", default="out", help="output folder (PNGs, grid.png, report.json)")
    g.add_argument("--trace", action="store_true", help="also write trace_XXXXX.png per image (token roles per step)")
    g.add_argument("--no-progress", action="store_true")

    pl = sub.add_parser("plugins", help="list the registered plugins and the hooks they implement")
    pl.set_defaults(func=cmd_plugins)
    pl.add_argument("--tunable", action="store_true", help="list only tunable plugins and their declared search spaces (`marcache tune`)")

    pol = sub.add_parser("policy", help="validate or show a policy")
    pol.set_defaults(func=cmd_policy)
    pol_sub = pol.add_subparsers(dest="policy_command", required=True, parser_class=_Parser)
    for name, text in (("validate", "check a policy as generate/flops would (dry run, nothing computed); exit 2 with one line if invalid"),
                       ("show", "print the resolved policy")):
        q = pol_sub.add_parser(name, help=text)
        q.add_argument("file")
        if name == "validate":
            q.add_argument("--model", default="mar_mnist",
                           help="registered model to check against (settings, head depth...; default mar_mnist, as generate)")
        q.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_parser(sub)
    return parser


# --------------------------------------------------------------------------- commands
def build_model(args):
    from .loading import fitting_configs, load_mar, read_state_dict

    if args.model is None and args.checkpoint is None:  # the shipped default: mar_mnist, trained weights
        from .weights import mnist_path

        return "mar_mnist", load_mar("mar_mnist", mnist_path(), weights=args.weights)
    name = args.model
    if name is None:  # infer the config from the checkpoint's shapes
        fits = fitting_configs(read_state_dict(args.checkpoint, args.weights))
        if not fits:
            raise ConfigError(f"{args.checkpoint}: its shapes fit no registered model; pass --model")
        name = fits[0]
    _check_vae_given(name, getattr(args, "vae", None))
    return name, load_mar(name, args.checkpoint, weights=args.weights)


def _check_vae_given(name: str, vae: Optional[str]) -> None:
    """A latent model without --vae is refused before its weights are built (seconds for mar_base)."""
    from .models.registry import model_config

    try:
        stride = model_config(name).get("vae_stride", 16)  # MAR's default stride: a latent model
    except KeyError:
        return  # load_mar names the unknown model
    if vae is None and stride > 1:
        raise ConfigError(VAE_NEEDED)


VAE_NEEDED = "this model produces KL-16 latents: pass --vae kl16.ckpt (or --vae random for shape checks)"


def build_vae(args, model):
    from .images import uses_vae
    from .loading import load_vae

    if not uses_vae(model):
        return None
    if args.vae is None:
        raise ConfigError(VAE_NEEDED)
    return load_vae(None if args.vae == "random" else args.vae)


def parse_labels(text: Optional[str], num_images: Optional[int], num_classes: int) -> list[int]:
    if text:
        try:
            labels = [int(x) for x in text.replace(" ", "").split(",") if x != ""]
        except ValueError:
            raise ConfigError(f"--labels {text!r}: expected comma-separated integers, e.g. --labels 1,7,9") from None
        if not labels:
            raise ConfigError(f"--labels {text!r}: no class id given, e.g. --labels 1,7,9")
        bad = next((x for x in labels if not 0 <= x < num_classes), None)
        if bad is not None:
            raise ConfigError(f"--labels: class id {bad} is not in [0, {num_classes - 1}]")
        if num_images is not None and len(labels) == 1:
            labels = labels * num_images
        return labels
    n = num_images if num_images is not None else 16
    return [i % num_classes for i in range(n)]


def cmd_generate(args) -> int:
    from .fileio import check_output_dir, output_errors, write_json_atomic
    from .safety import check_image_count
    from .images import save_grid, save_pngs, to_uint8, tokens_to_images
    from .policy import load_policy
    from .scheduler import Sampler
    from .plugins.trace import TraceRecorder

    policy = load_policy(args.policy, args.overrides)
    out = check_output_dir(args.out)
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size}: must be >= 1")
    if args.num_images is not None and args.num_images < 1:
        raise ConfigError(f"--num-images {args.num_images}: must be >= 1")
    name, model = build_model(args)
    vae = build_vae(args, model)
    check_image_count(model, args.num_images, "--num-images", out,
                      "generate fewer images per run (several runs with different --seed) or use `marcache eval "
                      "--generate-only`, which streams shards to disk")
    labels = parse_labels(args.labels, args.num_images, model.num_classes)
    tracer = TraceRecorder() if args.trace else None
    sampler = Sampler(model, policy, extra_plugins=[tracer] if tracer else [])
    result = sampler.generate(labels=labels, num_images=args.num_images, seed=args.seed,
                              batch_size=args.batch_size, progress=not args.no_progress)
    images = to_uint8(tokens_to_images(model, result.tokens, vae))

    names = [f"{i:05d}_class{lab}.png" for i, lab in zip(result.sample_ids.tolist(), labels)]
    report = dict(result.report, model=name, checkpoint=args.checkpoint, seed=args.seed, labels=labels,
                  batch_size=args.batch_size, images=names)
    with output_errors(out):  # each file complete or absent; a full disk is one line
        save_pngs(images, out, names)
        save_grid(images, out / "grid.png")
        if tracer:
            for sid in result.sample_ids.tolist():
                tracer.render(sid, (model.seq_h, model.seq_w), out / f"trace_{sid:05d}.png")
        write_json_atomic(out / "report.json", report)
    hits = report["cache_hits"]["decoder"]
    cached = f", {hits['hit_rate']:.1%} of decoder outputs from the feature cache" if hits["from_cache"] else ""
    speed = report.get("images_per_second")
    print(f"wrote {len(names)} images, grid.png and report.json to {out} "
          f"({f'{speed:.2f}' if speed else '?'} images/s, policy {policy.config.name}{cached})")
    return 0


def cmd_plugins(args) -> int:
    from .plugin import available_plugins
    from .search_space import describe_space

    if args.tunable:
        for name, cls in available_plugins().items():
            if cls.search_space is not None:
                kind = "built-in" if cls.builtin else cls.__module__
                print(f"{name} ({kind})")
                for line in describe_space(cls) or ["(no parameters: on/off only)"]:
                    print(f"    {line}")
        return 0
    for name, cls in available_plugins().items():
        kind = "built-in" if cls.builtin else cls.__module__
        hooks = ", ".join(h for h in cls.implemented_hooks() if h != "marcache_report")
        print(f"{name:18s} [{', '.join(sorted(cls.families))}] ({kind})\n    {cls.description}\n    hooks: {hooks}")
        if cls.conflicts:
            print(f"    conflicts with: {', '.join(cls.conflicts)}")
    return 0


def cmd_policy(args) -> int:
    from .policy import load_policy

    policy = load_policy(args.file, args.overrides)
    if args.policy_command == "validate":
        from .validation import validate_policy

        print(validate_policy(policy, args.model).line(policy.source))
    else:
        print(policy.to_yaml(), end="")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if getattr(args, "backend", None):  # the flag is an override applied last
            args.overrides = [*args.overrides, f"backend.name={args.backend}"]
        return args.func(args)
    except MarcacheError as exc:
        print(f"marcache: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("marcache: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `marcache plugins | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

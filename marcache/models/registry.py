"""Named MAR configurations (timm-style registry) and the model factory.

A config is a plain dict of official ``MAR(...)`` keyword arguments; ``norm_layer`` is written as the
registry name ``"layernorm_eps1e-6"`` so configs stay serialisable (JSON/YAML) and is turned into
``functools.partial(nn.LayerNorm, eps=1e-6)`` when the model is built.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .mar import MAR

NORM_LAYERS: dict[str, Callable[[int], nn.Module]] = {
    "layernorm_eps1e-6": functools.partial(nn.LayerNorm, eps=1e-6),
    "layernorm": nn.LayerNorm,
}

_MODEL_CONFIGS: dict[str, dict[str, Any]] = {}
_SAMPLING_DEFAULTS: dict[str, dict[str, Any]] = {}
#: sampler settings used when a policy leaves them null (official sample_tokens defaults otherwise)
OFFICIAL_SAMPLING = {"num_iter": 64, "cfg": 1.0, "cfg_schedule": "linear", "temperature": 1.0, "clip_denoised": False}


def register_model_config(name: str, config: Mapping[str, Any], sampling: Mapping[str, Any] | None = None) -> None:
    """Register a named MAR configuration (official constructor kwargs) and its sampler defaults."""
    if not name.isidentifier():
        raise ValueError(f"model name {name!r} must be an identifier")
    if name in _MODEL_CONFIGS:
        raise ValueError(f"model {name!r} is already registered")
    unknown = set(config) - set(MAR.__init__.__code__.co_varnames)
    if unknown:
        raise ValueError(f"model {name!r}: unknown MAR arguments {sorted(unknown)}")
    unknown = set(sampling or {}) - set(OFFICIAL_SAMPLING)
    if unknown:
        raise ValueError(f"model {name!r}: unknown sampling defaults {sorted(unknown)}")
    _MODEL_CONFIGS[name] = dict(config)
    _SAMPLING_DEFAULTS[name] = dict(OFFICIAL_SAMPLING, **(sampling or {}))


def list_models() -> list[str]:
    return sorted(_MODEL_CONFIGS)


def model_config(name: str) -> dict[str, Any]:
    """The constructor kwargs of a registered model (a copy)."""
    if name not in _MODEL_CONFIGS:
        raise KeyError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    return dict(_MODEL_CONFIGS[name])


def resolve_norm_layer(value: Any) -> Callable[[int], nn.Module]:
    """Accept a registry name, a ``{"callable": "torch.nn.LayerNorm", "eps": ...}`` spec, or a callable."""
    if callable(value):
        return value
    if isinstance(value, str):
        if value not in NORM_LAYERS:
            raise ValueError(f"unknown norm_layer {value!r}; known: {', '.join(NORM_LAYERS)}")
        return NORM_LAYERS[value]
    if isinstance(value, Mapping) and value.get("callable") == "torch.nn.LayerNorm":
        return functools.partial(nn.LayerNorm, eps=float(value.get("eps", 1e-5)))
    raise ValueError(f"norm_layer must be a name ({', '.join(NORM_LAYERS)}) or a LayerNorm spec, got {value!r}")


def create_model(name_or_kwargs: str | Mapping[str, Any], **overrides: Any) -> MAR:
    """Build a randomly initialised MAR from a registered name or a dict of constructor kwargs.

    Works under ``with torch.device("meta"):`` for shape-only uses (FLOP counting, key checks).
    """
    kwargs = model_config(name_or_kwargs) if isinstance(name_or_kwargs, str) else dict(name_or_kwargs)
    kwargs.update(overrides)
    if "norm_layer" in kwargs:
        kwargs["norm_layer"] = resolve_norm_layer(kwargs["norm_layer"])
    model = MAR(**kwargs)
    # sampler defaults for policies that leave num_iter / cfg / temperature null
    model.sampling_defaults = dict(_SAMPLING_DEFAULTS.get(name_or_kwargs, OFFICIAL_SAMPLING)) if isinstance(name_or_kwargs, str) else dict(OFFICIAL_SAMPLING)
    model.config_name = name_or_kwargs if isinstance(name_or_kwargs, str) else None
    return model


_COMMON = dict(img_size=256, vae_stride=16, patch_size=1, mlp_ratio=4.0, norm_layer="layernorm_eps1e-6",
               vae_embed_dim=16, class_num=1000, buffer_size=64, num_sampling_steps="100")

# Released checkpoints use larger heads than the constructor default (diffloss_d=3, diffloss_w=1024).
register_model_config("mar_base", dict(_COMMON, encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12,
                                       decoder_embed_dim=768, decoder_depth=12, decoder_num_heads=12,
                                       diffloss_d=6, diffloss_w=1024),
                      sampling=dict(num_iter=64, cfg=2.9))
register_model_config("mar_large", dict(_COMMON, encoder_embed_dim=1024, encoder_depth=16, encoder_num_heads=16,
                                        decoder_embed_dim=1024, decoder_depth=16, decoder_num_heads=16,
                                        diffloss_d=8, diffloss_w=1280),
                      sampling=dict(num_iter=64, cfg=3.0))
register_model_config("mar_huge", dict(_COMMON, encoder_embed_dim=1280, encoder_depth=20, encoder_num_heads=16,
                                       decoder_embed_dim=1280, decoder_depth=20, decoder_num_heads=16,
                                       diffloss_d=12, diffloss_w=1536),
                      sampling=dict(num_iter=64, cfg=3.2))
# A tiny pixel-space configuration for tests and examples: a 16x16 grey image as 4x4 tokens of
# 4x4 pixels (token dim 16, like KL-16), two blocks each side, a 2x64 head.
register_model_config("mar_tiny", dict(img_size=16, vae_stride=1, patch_size=4, encoder_embed_dim=64, encoder_depth=2,
                                       encoder_num_heads=4, decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4,
                                       mlp_ratio=4.0, norm_layer="layernorm_eps1e-6", vae_embed_dim=1, class_num=10,
                                       buffer_size=16, diffloss_d=2, diffloss_w=64, num_sampling_steps="100"),
                      sampling=dict(num_iter=8, cfg=3.0))


def meta_model(name_or_kwargs: str | Mapping[str, Any]) -> MAR:
    """Build on the meta device (no memory, no init cost): shapes only."""
    with torch.device("meta"):
        return create_model(name_or_kwargs)

# The shipped default (issue #10): a class-conditional MAR trained on MNIST in pixel space. A 28x28
# grey digit in [-1, 1] is 7x7 tokens of 4x4 pixels (token dim 16, like KL-16); 3+3 blocks of width
# 128, a 6x128 head (depth >= 5 so that head-block skipping has room). Weights: marcache/weights/.
register_model_config("mar_mnist", dict(img_size=28, vae_stride=1, patch_size=4, encoder_embed_dim=128, encoder_depth=3,
                                        encoder_num_heads=4, decoder_embed_dim=128, decoder_depth=3, decoder_num_heads=4,
                                        mlp_ratio=4.0, norm_layer="layernorm_eps1e-6", vae_embed_dim=1, class_num=10,
                                        attn_dropout=0.0, proj_dropout=0.0, buffer_size=16, diffloss_d=6, diffloss_w=128,
                                        num_sampling_steps="50", diffusion_batch_mul=2),
                      sampling=dict(num_iter=16, cfg=3.0, temperature=0.9, clip_denoised=True))  # docs/mnist.md#sampling-defaults

"""Model definitions: MAR, its diffusion head, the KL-16 VAE, and the named-config registry."""

from .diffloss import DiffLoss, SimpleMLPAdaLN
from .diffusion import GaussianDiffusion, diffusion_tables, respaced_timesteps
from .mar import MAR
from .registry import create_model, list_models, meta_model, model_config, register_model_config

__all__ = [
    "MAR",
    "DiffLoss",
    "SimpleMLPAdaLN",
    "GaussianDiffusion",
    "diffusion_tables",
    "respaced_timesteps",
    "create_model",
    "list_models",
    "meta_model",
    "model_config",
    "register_model_config",
    "AutoencoderKL",
]


def __getattr__(name):
    # The VAE is imported lazily: most uses (FLOP counting, token-space models) never need it.
    if name == "AutoencoderKL":
        from .vae import AutoencoderKL

        return AutoencoderKL
    raise AttributeError(name)

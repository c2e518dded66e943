"""Loading MAR and VAE weights safely: official ``.pth``/``.ckpt`` files, plain state dicts, safetensors.

``torch.load`` is only ever called with ``weights_only=True``; the one non-tensor object the official
MAR checkpoints carry (``args``, an ``argparse.Namespace``) is allow-listed. Every failure raises
:class:`~marcache.errors.CheckpointError` with one line naming the file and the fix.

Known trap: the community ``mar-base.safetensors`` holds the *non-EMA* weights (``checkpoint["model"]``;
FID 5.56 instead of 2.31). Official ``checkpoint-last.pth`` files hold both; marcache loads
``model_ema`` by default (``weights="model"`` selects the raw weights).
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import warnings
from typing import Any, Mapping, Optional

import torch

from .errors import CheckpointError
from .models.mar import MAR
from .models.registry import create_model, list_models, meta_model, model_config
from .safety import check_weights

WEIGHT_ENTRIES = ("model_ema", "model")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:160] if text else type(exc).__name__


def _refused_global(exc: BaseException) -> str:
    """The Python object a weights_only unpickler refused (``posix.system``, ``__main__.Evil``), if named."""
    match = re.search(r"GLOBAL ([\w.]+)", str(exc)) or re.search(r"global[: ]+([\w.]+)", str(exc), re.IGNORECASE)
    return match.group(1) if match else "a non-tensor object"


def read_state_dict(path: str | os.PathLike, weights: str = "model_ema", kind: str = "MAR") -> dict[str, torch.Tensor]:
    """Read a state dict from ``path``: safetensors, or a torch file (plain or ``{model, model_ema, ...}``)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file; pass the path of a {kind} checkpoint (.pth, .ckpt or .safetensors)")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as exc:  # noqa: BLE001 - untrusted bytes: every parse failure is the file's fault
            raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(exc)})") from None
    try:
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": the refusal below says it all
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to load {_refused_global(exc)} from its pickle: marcache loads only tensors and plain "
            f"containers (weights_only=True), never code; if you trust the file, convert it to .safetensors "
            f"(docs/models.md), and for an official checkpoint choose its entry with --weights model_ema or model"
        ) from None
    except Exception as exc:  # noqa: BLE001 - truncated zips, legacy formats, struct errors: all unreadable files
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({_first_line(exc)})") from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict or a dict with 'model'/'model_ema', got {type(obj).__name__}")
    if any(k in obj for k in WEIGHT_ENTRIES):
        if weights not in obj:
            present = [k for k in WEIGHT_ENTRIES if k in obj]
            raise CheckpointError(f"{path}: has no '{weights}' entry (it has {present}); choose --weights {present[0]}")
        obj = obj[weights]
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{path}: entry '{weights}' is a {type(obj).__name__}, not a state dict "
                                  f"(parameter name -> tensor): not a {kind} checkpoint")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        what = f"key {bad[0]!r} is a {type(bad[0]).__name__}" if not isinstance(bad[0], str) else \
            f"entry {bad[0]!r} is a {type(obj[bad[0]]).__name__}, not a tensor"
        raise CheckpointError(f"{path}: {what}: not a {kind} state dict")
    return dict(obj)


def fitting_configs(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of registered MAR configs whose parameter shapes equal those in ``state``."""
    fits = []
    for name in list_models():
        ref = meta_model(name).state_dict()
        if ref.keys() == state.keys() and all(ref[k].shape == state[k].shape for k in ref):
            fits.append(name)
    return fits


def check_state_dict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], path: str, describe_fits: bool = True) -> None:
    """Raise one clear line for missing/extra keys or shape mismatches (before touching the model)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if not (missing or extra or wrong):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s) (e.g. {missing[0]!r})")
    if extra:
        parts.append(f"{len(extra)} unexpected key(s) (e.g. {extra[0]!r})")
    if wrong:
        k = wrong[0]
        parts.append(f"{len(wrong)} shape mismatch(es) (e.g. {k!r}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)})")
    hint = ""
    if describe_fits:
        fits = fitting_configs(state)
        hint = f"; the file's shapes fit --model {fits[0]}" if fits else "; the file fits no registered model config"
    raise CheckpointError(f"{path}: does not match the model: {'; '.join(parts)}{hint}")


def load_mar(
    name_or_kwargs: str | Mapping[str, Any],
    checkpoint: Optional[str | os.PathLike] = None,
    weights: str = "model_ema",
    device: str | torch.device = "cpu",
) -> MAR:
    """Build a MAR by name (``mar_base``, ...) or kwargs; load ``checkpoint`` strictly if given.

    Without a checkpoint the model is randomly initialised (official init). ``weights`` picks the
    entry of an official ``checkpoint-last.pth`` (``model_ema`` default, or ``model``). Returns the
    model in eval mode on ``device``.
    """
    if weights not in WEIGHT_ENTRIES:
        raise CheckpointError(f"weights={weights!r}: choose one of {', '.join(WEIGHT_ENTRIES)}")
    if isinstance(name_or_kwargs, str):
        try:
            model_config(name_or_kwargs)
        except KeyError as exc:
            raise CheckpointError(str(exc.args[0])) from None
    if checkpoint is None:
        model = create_model(name_or_kwargs)
    else:
        state = read_state_dict(checkpoint, weights)
        with torch.device("meta"):
            model = create_model(name_or_kwargs)
        check_state_dict(model, state, os.fspath(checkpoint))
        check_weights(state, model.state_dict(), os.fspath(checkpoint))
        model = model.to_empty(device="cpu")
        model.load_state_dict(state, strict=True)
        _rebuild_tables(model)
    return model.to(device).eval()


def _rebuild_tables(model: torch.nn.Module) -> None:
    """Recompute non-persistent diffusion tables (they were allocated empty by ``to_empty``)."""
    from .models.diffusion import GaussianDiffusion

    for module in model.modules():
        if isinstance(module, GaussianDiffusion):
            fresh = GaussianDiffusion(module.spec)
            for name, buf in fresh.named_buffers():
                setattr(module, name, buf)


def load_vae(checkpoint: Optional[str | os.PathLike] = None, device: str | torch.device = "cpu"):
    """The KL-16 VAE, randomly initialised or loaded strictly from ``kl16.ckpt`` / safetensors."""
    from .models.vae import AutoencoderKL

    if checkpoint is None:
        return AutoencoderKL().to(device).eval()
    state = read_state_dict(checkpoint, weights="model", kind="VAE")
    with torch.device("meta"):
        vae = AutoencoderKL()
    check_state_dict(vae, state, os.fspath(checkpoint), describe_fits=False)
    check_weights(state, vae.state_dict(), os.fspath(checkpoint))
    vae = vae.to_empty(device="cpu")
    vae.load_state_dict(state, strict=True)
    return vae.to(device).eval()

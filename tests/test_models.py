"""Named configs, state-dict layout, and safe checkpoint loading."""

import argparse
import collections

import pytest
import torch
from safetensors.torch import save_file

import marcache
from marcache.errors import CheckpointError
from marcache.models import list_models, meta_model

# mar.md §1-2: state-dict tensors and total parameters of the released configurations
OFFICIAL = {
    "mar_base": (364, 207_924_768),
    "mar_large": (476, 478_326_304),
    "mar_huge": (604, 942_403_104),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_layout(name):
    model = meta_model(name)
    state = model.state_dict()
    tensors, params = OFFICIAL[name]
    assert len(state) == tensors
    assert sum(v.numel() for v in state.values()) == params
    assert not list(model.buffers(recurse=True)) or all(
        n not in state for n, _ in model.named_buffers()
    ), "diffusion tables must stay out of the state dict"
    first = list(state)[:5]
    assert first == ["fake_latent", "encoder_pos_embed_learned", "mask_token", "decoder_pos_embed_learned", "diffusion_pos_embed_learned"]
    d = model.encoder_pos_embed_learned.shape[-1]
    assert state["encoder_pos_embed_learned"].shape == (1, 320, d)
    assert state["diffusion_pos_embed_learned"].shape == (1, 256, d)
    assert state["class_emb.weight"].shape == (1000, d)


def test_head_sizes_and_head_dim():
    huge = meta_model("mar_huge")
    assert huge.encoder_blocks[0].attn.head_dim == 80
    w = {n: meta_model(n).diffloss.net.model_channels for n in OFFICIAL}
    d = {n: meta_model(n).diffloss.net.num_res_blocks for n in OFFICIAL}
    assert (w, d) == ({"mar_base": 1024, "mar_large": 1280, "mar_huge": 1536}, {"mar_base": 6, "mar_large": 8, "mar_huge": 12})


def test_every_registered_model_builds_on_meta():
    """Each registered config builds on meta with the token grid its image size, VAE stride and patch
    size imply (official defaults where the config leaves them out), and positional tables that fit."""
    import inspect

    from marcache.models import MAR, model_config

    defaults = {k: p.default for k, p in inspect.signature(MAR).parameters.items()}
    for name in list_models():
        cfg = {**defaults, **model_config(name)}
        side = cfg["img_size"] // cfg["vae_stride"] // cfg["patch_size"]
        model = meta_model(name)
        assert (model.seq_h, model.seq_w) == (side, side) and side > 0, name
        assert model.encoder_pos_embed_learned.shape[1] == side * side + cfg["buffer_size"], name
        assert model.diffusion_pos_embed_learned.shape[1] == side * side, name


def test_create_from_kwargs_and_unknown_name():
    model = marcache.create_model("mar_tiny", class_num=3)
    assert model.class_emb.weight.shape[0] == 3
    with pytest.raises(KeyError, match="unknown model"):
        marcache.create_model("mar_gigantic")
    with pytest.raises(CheckpointError, match="unknown model"):
        marcache.load_mar("mar_gigantic")


def _tiny_state(seed):
    torch.manual_seed(seed)
    return marcache.create_model("mar_tiny").state_dict()


def test_official_layout_round_trip_selects_ema(tmp_path):
    raw, ema = _tiny_state(0), _tiny_state(1)
    path = tmp_path / "checkpoint-last.pth"
    torch.save({"model": raw, "model_ema": ema, "epoch": 799, "args": argparse.Namespace(model="mar_tiny", lr=1e-4)}, path)
    default = marcache.load_mar("mar_tiny", path)
    chosen = marcache.load_mar("mar_tiny", path, weights="model")
    assert torch.equal(default.fake_latent, ema["fake_latent"])
    assert torch.equal(chosen.fake_latent, raw["fake_latent"])
    assert not default.training
    # the diffusion tables are rebuilt after loading onto an empty model
    assert torch.allclose(default.diffloss.gen_diffusion.betas, marcache.create_model("mar_tiny").diffloss.gen_diffusion.betas)


def test_mar_base_official_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = marcache.create_model("mar_base")
    state = model.state_dict()
    path = tmp_path / "checkpoint-last.pth"
    # model and model_ema share storage here so the file stays ~0.8 GB
    torch.save({"model": state, "model_ema": state, "args": argparse.Namespace(model="mar_base")}, path)
    loaded = marcache.load_mar("mar_base", path)
    for key in ("fake_latent", "decoder_blocks.11.mlp.fc2.weight", "diffloss.net.res_blocks.5.adaLN_modulation.1.weight"):
        assert torch.equal(loaded.state_dict()[key], state[key])


def test_plain_and_safetensors_state_dicts(tmp_path):
    state = _tiny_state(2)
    torch.save(state, tmp_path / "plain.pt")
    save_file(state, tmp_path / "w.safetensors")
    for name in ("plain.pt", "w.safetensors"):
        model = marcache.load_mar("mar_tiny", tmp_path / name)
        assert torch.equal(model.mask_token, state["mask_token"])


def test_refuses_extra_key(tmp_path):
    state = _tiny_state(0)
    state["surprise"] = torch.zeros(1)
    torch.save(state, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match=r"x\.pt: .*1 unexpected key\(s\) \(e\.g\. 'surprise'\)"):
        marcache.load_mar("mar_tiny", tmp_path / "x.pt")


def test_wrong_shape_names_fitting_config(tmp_path):
    torch.save(_tiny_state(0), tmp_path / "tiny.pt")
    with pytest.raises(CheckpointError, match="fit --model mar_tiny"):
        marcache.load_mar("mar_base", tmp_path / "tiny.pt")
    state = _tiny_state(0)
    state["z_proj.weight"] = torch.zeros(3, 3)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"shape mismatch.*z_proj\.weight.*fits no registered"):
        marcache.load_mar("mar_tiny", tmp_path / "bad.pt")


class NotATensor:
    pass


def test_refuses_pickled_objects(tmp_path):
    state = _tiny_state(0)
    torch.save({"model_ema": state, "payload": NotATensor()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refused to load .* from its pickle"):
        marcache.load_mar("mar_tiny", tmp_path / "evil.pth")


def test_refuses_non_tensor_entries_and_missing_files(tmp_path):
    state = collections.OrderedDict(_tiny_state(0))
    state["fake_latent"] = [1, 2]
    torch.save(state, tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a tensor"):
        marcache.load_mar("mar_tiny", tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="no such file"):
        marcache.load_mar("mar_tiny", tmp_path / "nope.pth")
    torch.save({"model": _tiny_state(0)}, tmp_path / "raw_only.pth")
    with pytest.raises(CheckpointError, match="choose --weights model"):
        marcache.load_mar("mar_tiny", tmp_path / "raw_only.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"not really")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        marcache.load_mar("mar_tiny", tmp_path / "junk.safetensors")


def test_vae_loader_round_trip(tmp_path):
    from marcache.models.vae import AutoencoderKL

    with torch.device("meta"):
        ref = AutoencoderKL()
    small = {k: torch.full(v.shape, 0.01) for k, v in ref.state_dict().items()}
    torch.save({"model": small}, tmp_path / "kl16.ckpt")
    vae = marcache.load_vae(tmp_path / "kl16.ckpt")
    assert torch.equal(vae.quant_conv.weight, small["quant_conv.weight"])
    del small["quant_conv.bias"]
    torch.save({"model": small}, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError, match="missing key"):
        marcache.load_vae(tmp_path / "bad.ckpt")

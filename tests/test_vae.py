"""Tests for marcache.models.vae (MAR's KL-16 autoencoder)."""

import math

import pytest
import torch

from marcache.models.vae import (
    LATENT_SCALE,
    AttnBlock,
    AutoencoderKL,
    DiagonalGaussianDistribution,
    decode_tokens,
    encode_to_tokens,
)

TOTAL_PARAMS = 66_456_019
ENCODER_PARAMS = 28_265_760
DECODER_PARAMS = 38_188_931
PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


def _numel(module):
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def meta_vae():
    with torch.device("meta"):
        return AutoencoderKL()


@pytest.fixture(scope="module")
def cpu_vae():
    torch.manual_seed(0)
    return AutoencoderKL().eval()


# --------------------------------------------------------------------------- #
# Structure (meta device, no memory or compute)
# --------------------------------------------------------------------------- #


def test_meta_param_counts(meta_vae):
    assert all(p.device.type == "meta" for p in meta_vae.parameters())
    assert _numel(meta_vae) == TOTAL_PARAMS
    assert _numel(meta_vae.encoder) == ENCODER_PARAMS
    assert _numel(meta_vae.decoder) == DECODER_PARAMS
    sd = meta_vae.state_dict()
    assert len(sd) == 312
    assert len(list(meta_vae.buffers())) == 0
    assert all(k.startswith(PREFIXES) for k in sd)


@pytest.mark.parametrize(
    "key, shape",
    [
        ("encoder.conv_in.weight", (128, 3, 3, 3)),
        ("encoder.down.0.block.0.norm1.weight", (128,)),
        ("encoder.down.2.block.0.nin_shortcut.weight", (256, 128, 1, 1)),
        ("encoder.down.3.downsample.conv.weight", (256, 256, 3, 3)),
        ("encoder.down.4.attn.1.q.weight", (512, 512, 1, 1)),
        ("encoder.down.4.attn.0.proj_out.bias", (512,)),
        ("encoder.mid.attn_1.k.weight", (512, 512, 1, 1)),
        ("encoder.conv_out.weight", (32, 512, 3, 3)),
        ("quant_conv.weight", (32, 32, 1, 1)),
        ("post_quant_conv.weight", (16, 16, 1, 1)),
        ("decoder.conv_in.weight", (512, 16, 3, 3)),
        ("decoder.mid.block_2.conv2.weight", (512, 512, 3, 3)),
        ("decoder.up.3.block.0.nin_shortcut.weight", (256, 512, 1, 1)),
        ("decoder.up.4.upsample.conv.weight", (512, 512, 3, 3)),
        ("decoder.up.0.block.2.conv2.weight", (128, 128, 3, 3)),
        ("decoder.conv_out.weight", (3, 128, 3, 3)),
    ],
)
def test_meta_key_shapes(meta_vae, key, shape):
    sd = meta_vae.state_dict()
    assert key in sd
    assert tuple(sd[key].shape) == shape


def test_meta_absent_modules(meta_vae):
    keys = list(meta_vae.state_dict())
    # No attention in the decoder's upsampling path, nor in encoder levels != 16x16.
    assert not any(k.startswith("decoder.up.") and ".attn." in k for k in keys)
    assert not any(k.startswith("encoder.down.") and ".attn." in k and not k.startswith("encoder.down.4.")
                   for k in keys)
    # Last encoder level has no downsample, first decoder level no upsample.
    assert not any(k.startswith("encoder.down.4.downsample") for k in keys)
    assert not any(k.startswith("decoder.up.0.upsample") for k in keys)
    # No timestep-embedding projections.
    assert not any("temb" in k for k in keys)
    assert sum(1 for k in keys if k.startswith("decoder.up.") and k.endswith("conv1.weight")) == 15


def test_ckpt_path_rejected():
    with pytest.raises(ValueError, match="load_vae"):
        with torch.device("meta"):
            AutoencoderKL(ckpt_path="kl16.ckpt")


# --------------------------------------------------------------------------- #
# Numerics on CPU, float32
# --------------------------------------------------------------------------- #


def test_attention_matches_explicit_softmax():
    torch.manual_seed(1)
    block = AttnBlock(64).eval()
    x = torch.randn(2, 64, 5, 3)
    with torch.no_grad():
        out = block(x)
        h = block.norm(x)
        b, c, hh, ww = x.shape
        q = block.q(h).reshape(b, c, -1).transpose(1, 2)
        k = block.k(h).reshape(b, c, -1)
        v = block.v(h).reshape(b, c, -1)
        w = torch.softmax(torch.bmm(q, k) * c ** -0.5, dim=2)
        ref = x + block.proj_out(torch.bmm(v, w.transpose(1, 2)).reshape(b, c, hh, ww))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)






def test_logvar_clamp(cpu_vae):
    qc = cpu_vae.quant_conv
    saved_w, saved_b = qc.weight.detach().clone(), qc.bias.detach().clone()
    try:
        with torch.no_grad():
            qc.weight.zero_()
            qc.bias.zero_()
            qc.bias[:16] = 3.0  # mean
            qc.bias[16:24] = 1e4  # logvar way above +20
            qc.bias[24:] = -1e4  # logvar way below -30
            post = cpu_vae.encode(torch.zeros(1, 3, 16, 16))  # 1x1 latent, cheap
    finally:
        with torch.no_grad():
            qc.weight.copy_(saved_w)
            qc.bias.copy_(saved_b)
    assert post.mean.shape == (1, 16, 1, 1)
    assert torch.all(post.mean == 3.0)
    assert torch.all(post.logvar[:, :8] == 20.0)
    assert torch.all(post.logvar[:, 8:] == -30.0)
    torch.testing.assert_close(post.std[:, :8], torch.full((1, 8, 1, 1), math.exp(10.0)))
    torch.testing.assert_close(post.std[:, 8:], torch.full((1, 8, 1, 1), math.exp(-15.0)))
    assert torch.equal(post.mode(), post.mean)


def test_token_helpers_scale(cpu_vae):
    torch.manual_seed(4)
    z = torch.randn(1, 16, 1, 1)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(decode_tokens(cpu_vae, z * LATENT_SCALE), cpu_vae.decode(z))
        tokens = encode_to_tokens(cpu_vae, x, generator=torch.Generator().manual_seed(5))
        expected = cpu_vae.encode(x).sample(generator=torch.Generator().manual_seed(5)) * LATENT_SCALE
    assert LATENT_SCALE == 0.2325
    assert tokens.shape == (1, 16, 1, 1)
    torch.testing.assert_close(tokens, expected)


def test_forward_returns_reconstruction_and_posterior(cpu_vae):
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        dec, post = cpu_vae(x, sample_posterior=False)
        expected = cpu_vae.decode(post.mode())
    assert dec.shape == (1, 3, 16, 16)
    torch.testing.assert_close(dec, expected)


def test_strict_state_dict_round_trip(cpu_vae):
    torch.manual_seed(123)
    other = AutoencoderKL()
    assert not torch.equal(other.decoder.conv_out.weight, cpu_vae.decoder.conv_out.weight)
    result = other.load_state_dict(cpu_vae.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for (k1, v1), (k2, v2) in zip(other.state_dict().items(), cpu_vae.state_dict().items()):
        assert k1 == k2
        assert torch.equal(v1, v2)


def test_decode_full_size(cpu_vae):
    torch.manual_seed(2)
    z = torch.randn(1, 16, 16, 16)
    with torch.no_grad():
        img = cpu_vae.decode(z)
    assert img.shape == (1, 3, 256, 256)
    assert img.dtype == torch.float32
    assert torch.isfinite(img).all()
    assert img.std() > 0


def test_encode_posterior_shapes(cpu_vae):
    torch.manual_seed(3)
    x = torch.rand(1, 3, 256, 256) * 2 - 1
    with torch.no_grad():
        post = cpu_vae.encode(x)
        g1 = torch.Generator().manual_seed(7)
        g2 = torch.Generator().manual_seed(7)
        s1 = post.sample(generator=g1)
        s2 = post.sample(generator=g2)
    assert isinstance(post, DiagonalGaussianDistribution)
    for t in (post.mean, post.std, post.mode(), s1):
        assert t.shape == (1, 16, 16, 16)
        assert torch.isfinite(t).all()
    assert torch.equal(s1, s2)  # generator makes sampling reproducible
    assert not torch.equal(s1, post.mean)

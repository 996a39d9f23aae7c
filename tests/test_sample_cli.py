"""Sampling pipeline and `mugv sample` end to end on a tiny random MUGDiT, tiny T5 and small VideoVAE."""

import json
import os

import numpy as np
import pytest
import torch

from mugv.cli.main import main as cli
from mugv.sampling import (
    autoencoder_spec,
    generate,
    load_autoencoder,
    register_autoencoder,
    sample_latents,
)
from mugv.text import T5TextEncoder, make_tiny_t5
from mugv.utils.video import read_video, to_uint8_frames, video_fps, write_image, write_video
from mugv.vae import VideoVAE, VideoVAEConfig
from tests.conftest import TINY, tiny_model

SMALL_VAE = dict(
    spatial_channels=[8, 8, 16, 16], spatial_layers=1, spatial_groups=4,
    temporal_filters=8, temporal_res_blocks=1, temporal_groups=4,
)  # fmt: skip


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    model = tiny_model(seed=2).eval()
    hf = str(root / "hf")
    model.save_pretrained(hf)
    t5 = make_tiny_t5(root / "t5", d_model=TINY["caption_channels"], num_heads=2)
    torch.manual_seed(0)
    vae = VideoVAE(VideoVAEConfig(**SMALL_VAE))
    vae_pt = str(root / "vae.pt")
    torch.save(vae.state_dict(), vae_pt)
    (root / "vae.json").write_text(
        json.dumps({"kind": "video_vae", "weights": "vae.pt", "config": SMALL_VAE})
    )
    return dict(root=root, model=model, hf=hf, t5=t5, vae_pt=vae_pt, vae=vae.eval())


@pytest.fixture(scope="module")
def text(assets):
    return T5TextEncoder(assets["t5"], max_length=16, device="cpu")


def test_sample_cli_writes_an_mp4(assets, tmp_path):
    out = str(tmp_path / "t2v.mp4")
    args = ["sample", "--model", assets["hf"], "--t5", assets["t5"], "--text-length", "16",
            "--vae", assets["vae_pt"], "--prompt", "a red ball", "--frames", "9", "--height", "16",
            "--width", "24", "--steps", "2", "--fps", "8", "--out", out]  # fmt: skip
    assert cli(args) == 0
    frames = read_video(out)
    assert frames.shape == (9, 16, 24, 3)
    assert video_fps(out) == 8.0


def test_sample_cli_image_to_video_from_a_megatron_checkpoint(assets, tmp_path):
    from mugv.convert import from_hf

    ckpt = str(tmp_path / "ckpt")
    from_hf(assets["hf"], ckpt)
    image = str(tmp_path / "ref.png")
    write_image(image, (np.random.default_rng(0).random((20, 30, 3)) * 255).astype(np.uint8))
    out = str(tmp_path / "i2v.mp4")
    args = ["sample", "--model", ckpt, "--ema", "--t5", assets["t5"], "--text-length", "16",
            "--vae", str(assets["root"] / "vae.json"), "--prompt", "x", "--image", image,
            "--frames", "17", "--height", "16", "--width", "16", "--steps", "1", "--out", out]  # fmt: skip
    assert cli(args) == 0
    assert read_video(out).shape == (17, 16, 16, 3)


def test_generate_is_seeded_and_uses_the_negative_prompt_only_with_guidance(assets, text):
    model, vae = assets["model"], assets["vae"]
    a = generate(model, text, vae, ["a cat"], seed=1, num_frames=9, height=16, width=16, steps=2)
    assert a.shape == (1, 3, 9, 16, 16) and a.abs().max() <= 1
    lat = lambda **kw: sample_latents(model, text, ["a cat"], (2, 2, 2), steps=2, **{"seed": 1, **kw})
    z = lat()
    with torch.no_grad():
        torch.testing.assert_close(a, vae.decode(z).clamp(-1, 1), rtol=0, atol=0)
    assert torch.equal(z, lat()) and not torch.equal(z, lat(seed=2))
    assert not torch.equal(z, lat(negative_prompt="blurry"))
    assert torch.equal(lat(guidance=1.0), lat(guidance=1.0, negative_prompt="blurry"))


def test_i2v_holds_the_reference_latent(assets, text):
    model = assets["model"]
    cond = torch.randn(1, 24, 1, 2, 2)
    z = sample_latents(model, text, ["a", "b"], (2, 2, 2), steps=3, seed=0, cond_latent=cond)
    assert z.shape == (2, 24, 2, 2, 2)
    assert torch.equal(z[:, :, :1], cond.expand(2, -1, -1, -1, -1))


def test_autoencoder_spec_rules(assets, tmp_path):
    vae_pt = assets["vae_pt"]
    weights, spec = autoencoder_spec(vae_pt)  # vae.json next to vae.pt
    assert weights == vae_pt and spec["kind"] == "video_vae"
    plain = str(tmp_path / "other.pt")
    torch.save({}, plain)
    assert autoencoder_spec(plain) == (plain, {"kind": "video_vae"})
    # a spec cannot name code to run: the old "factory" kind is gone; registered kinds load
    factory = tmp_path / "ae.json"
    factory.write_text(
        json.dumps({"kind": "factory", "factory": "tests.test_sample_cli:identity_autoencoder"})
    )
    with pytest.raises(ValueError, match="unknown autoencoder kind 'factory'"):
        load_autoencoder(str(factory))
    register_autoencoder("identity_test", identity_autoencoder)
    (tmp_path / "id.json").write_text(json.dumps({"kind": "identity_test"}))
    ae = load_autoencoder(str(tmp_path / "id.json"))
    x = torch.randn(2)
    assert type(ae).__name__ == "IdentityAE" and ae.decode(x) is x
    (tmp_path / "bad.json").write_text(json.dumps({"kind": "nope"}))
    with pytest.raises(ValueError, match="unknown autoencoder kind 'nope'"):
        load_autoencoder(str(tmp_path / "bad.json"))


class IdentityAE:
    def encode(self, x):
        return x

    def decode(self, z):
        return z


def identity_autoencoder(weights, spec, device, dtype):
    return IdentityAE()


def test_write_video_round_trip_and_errors(tmp_path):
    frames = np.zeros((3, 8, 10, 3), np.uint8)
    frames[:, :, :, 0] = np.array([0, 128, 255], np.uint8)[:, None, None]
    path = write_video(str(tmp_path / "v.mp4"), torch.from_numpy(frames), fps=12)
    back = read_video(path)
    assert back.shape == frames.shape and np.abs(back.astype(int) - frames).max() <= 8
    with pytest.raises(ValueError, match="even"):
        write_video(str(tmp_path / "odd.mp4"), np.zeros((1, 7, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        write_video(str(tmp_path / "f.mp4"), np.zeros((1, 8, 8, 3), np.float32))
    assert not os.path.exists(tmp_path / "odd.mp4")
    assert torch.equal(
        to_uint8_frames(torch.full((3, 2, 4, 4), -1.0)), torch.zeros(2, 4, 4, 3, dtype=torch.uint8)
    )


def test_chunked_decode_equals_decoding_all_features_at_once(assets):
    """VideoVAE.decode streams chunk -> 2D decoder -> out_device; the same numbers as the
    temporal decoder over every chunk first and one 2D-decoder call over all frames."""
    vae = VideoVAE(VideoVAEConfig(**SMALL_VAE, decode_chunk=2, frame_batch=3)).eval()
    vae.load_state_dict(assets["vae"].state_dict())  # latents 1.. in 2 chunks, 3 frames per 2D call
    z = torch.randn(1, 24, 5, 2, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        streamed = vae.decode(z, out_device="cpu")
        raw = z * vae.scale + vae.shift
        feats = torch.cat([vae.temporal_vae.decode(raw[:, :, :1])[:, :, -1:]]
                          + [vae.temporal_vae.decode(c) for c in raw[:, :, 1:].split(vae.config.decode_chunk, 2)], 2)  # fmt: skip
        frames = feats.transpose(1, 2).flatten(0, 1)  # every frame in one 2D-decoder call
        whole = vae.spatial_vae.module.decoder(frames / vae.spatial_vae.scaling_factor)
        whole = whole.unflatten(0, (1, -1)).transpose(1, 2)
    assert streamed.shape == whole.shape == (1, 3, 33, 16, 24)
    torch.testing.assert_close(streamed, whole, rtol=0, atol=1e-5)

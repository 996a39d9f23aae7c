"""Video VAE: release key layout, frame arithmetic, normalisation, group independence, chunking."""

import pytest
import torch
from conftest import SMALL_VAE

from mugv.vae import VideoVAE, VideoVAEConfig, latent_frames, pixel_frames

SMALL = dict(SMALL_VAE, frame_batch=5, group_batch=2)


def small_vae(seed: int = 0, **overrides) -> VideoVAE:
    torch.manual_seed(seed)
    vae = VideoVAE(VideoVAEConfig(**{**SMALL, **overrides})).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in vae.parameters():  # norm weights too, so no block is an identity by accident
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return vae


def pixels(b: int, f: int, h: int = 16, w: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.rand(b, 3, f, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def vae():
    return small_vae()


def release_meta_state_dict() -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return VideoVAE(VideoVAEConfig()).state_dict()


def test_release_layout_has_522_keys_with_release_shapes():
    sd = release_meta_state_dict()
    assert len(sd) == 522
    tops = {k if k in ("scale", "shift", "logvar") else k.split(".")[0] for k in sd}
    assert tops == {"scale", "shift", "logvar", "spatial_vae", "temporal_vae"}
    assert all(k.startswith("spatial_vae.module.") for k in sd if k.startswith("spatial_vae"))
    assert sum(k.startswith("spatial_vae.module.") for k in sd) == 244
    assert sum(k.startswith("temporal_vae.") for k in sd) == 275
    shapes = {
        "scale": (1, 24, 1, 1, 1),
        "shift": (1, 24, 1, 1, 1),
        "logvar": (),
        "spatial_vae.module.encoder.conv_in.weight": (128, 3, 3, 3),
        "spatial_vae.module.encoder.mid_block.attentions.0.to_q.weight": (512, 512),
        "spatial_vae.module.encoder.conv_out.weight": (8, 512, 3, 3),
        "spatial_vae.module.encoder.down_blocks.1.resnets.0.conv_shortcut.weight": (256, 128, 1, 1),
        "spatial_vae.module.decoder.conv_in.weight": (512, 4, 3, 3),
        "spatial_vae.module.decoder.up_blocks.3.resnets.2.conv2.weight": (128, 128, 3, 3),
        "temporal_vae.encoder.conv_in.conv.weight": (128, 512, 3, 3, 3),
        "temporal_vae.encoder.block_res_blocks.3.0.conv3.conv.weight": (512, 256, 1, 1, 1),
        "temporal_vae.encoder.conv_blocks.2.conv.bias": (256,),
        "temporal_vae.encoder.conv2.conv.weight": (48, 512, 1, 1, 1),
        "temporal_vae.quant_conv.conv.weight": (48, 48, 1, 1, 1),
        "temporal_vae.post_quant_conv.conv.weight": (24, 24, 1, 1, 1),
        "temporal_vae.decoder.conv1.conv.weight": (512, 24, 3, 3, 3),
        "temporal_vae.decoder.upsample_block.conv2.conv.weight": (512, 512, 3, 3, 3),
        "temporal_vae.decoder.conv_blocks.2.conv.weight": (1024, 512, 3, 3, 3),
        "temporal_vae.decoder.conv_blocks.1.conv.weight": (512, 256, 3, 3, 3),
        "temporal_vae.decoder.conv_out.conv.weight": (512, 128, 3, 3, 3),
    }
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any(k.startswith("temporal_vae.decoder.conv_blocks.0") for k in sd)


def test_from_release_is_strict_and_names_the_bad_key():
    sd = release_meta_state_dict()
    model = VideoVAE.from_release(sd, device="meta")
    assert set(model.state_dict()) == set(sd) and not model.training
    with pytest.raises(ValueError, match="temporal_vae.decoder.conv_out.conv.bias"):
        VideoVAE.from_release(
            {k: v for k, v in sd.items() if k != "temporal_vae.decoder.conv_out.conv.bias"}, device="meta"
        )
    with pytest.raises(ValueError, match="spatial_vae.module.quant_conv.weight"):
        VideoVAE.from_release({**sd, "spatial_vae.module.quant_conv.weight": sd["logvar"]}, device="meta")
    with pytest.raises(ValueError, match=r"key scale has shape \(24,\)"):
        VideoVAE.from_release({**sd, "scale": torch.empty(24, device="meta")}, device="meta")


def test_from_release_file_roundtrip(vae, tmp_path):
    path = tmp_path / "vae.pt"
    torch.save(vae.state_dict(), path)
    loaded = VideoVAE.from_release(path, VideoVAEConfig(**SMALL))
    x = pixels(1, 9)
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), vae.encode(x))
    with pytest.raises(FileNotFoundError, match="nowhere/vae.pt"):
        VideoVAE.from_release(tmp_path / "nowhere" / "vae.pt")


def test_frame_arithmetic():
    for f, t in [(105, 14), (73, 10), (9, 2), (1, 1), (17, 3)]:
        assert latent_frames(f) == t and pixel_frames(t) == f
        assert VideoVAE.latent_frames(f) == t
    for bad in (0, 8, 10, 104, -7):
        with pytest.raises(ValueError, match=str(bad)):
            latent_frames(bad)
    with pytest.raises(ValueError, match="latent frame count 0"):
        pixel_frames(0)


def test_encode_decode_shapes_and_bad_inputs(vae):
    with torch.no_grad():
        z = vae.encode(pixels(2, 9, 16, 24))
        assert z.shape == (2, 24, 2, 2, 3)
        assert vae.decode(z).shape == (2, 3, 9, 16, 24)
        img = vae.encode(pixels(1, 1))
        assert img.shape == (1, 24, 1, 2, 2)
        assert vae.decode(img).shape == (1, 3, 1, 16, 16)
        with pytest.raises(ValueError, match="frame count 8"):
            vae.encode(pixels(1, 8))
        with pytest.raises(ValueError, match="12x16"):
            vae.encode(pixels(1, 9, 12, 16))
        with pytest.raises(ValueError, match=r"\[B, 3, F, H, W\]"):
            vae.encode(torch.zeros(1, 4, 9, 16, 16))
        with pytest.raises(ValueError, match=r"\[B, 24, T, h, w\]"):
            vae.decode(torch.zeros(1, 4, 2, 2, 2))


def test_105_frames_round_trip_shapes(vae):
    with torch.no_grad():
        z = vae.encode(pixels(1, 105, 8, 8))
        assert z.shape == (1, 24, 14, 1, 1)
        assert vae.decode(z).shape == (1, 3, 105, 8, 8)


def test_normalisation_uses_shift_and_scale():
    vae = small_vae()
    x = pixels(1, 9)
    g = torch.Generator().manual_seed(3)
    shift, scale = torch.randn(1, 24, 1, 1, 1, generator=g), torch.rand(1, 24, 1, 1, 1, generator=g) + 0.5
    with torch.no_grad():
        vae.shift.zero_()
        vae.scale.fill_(1.0)
        raw = vae.encode(x)
        z_raw_decoded = vae.decode(raw)
        vae.shift.copy_(shift)
        vae.scale.copy_(scale)
        z = vae.encode(x)
        torch.testing.assert_close(z, (raw - shift) / scale)
        torch.testing.assert_close(vae.decode(z), z_raw_decoded, rtol=1e-4, atol=1e-5)
    assert {"shift", "scale"} <= set(vae.state_dict())


def test_release_normalisation_defaults():
    cfg = VideoVAEConfig()
    assert cfg.shift[2] == -0.796875 and cfg.scale[4] == 3.3516 and len(cfg.scale) == 24


def test_8_frame_groups_are_encoded_independently(vae):
    x = pixels(1, 17)  # groups: [frame 0 x8], frames 1-8, frames 9-16
    late = x.clone()
    late[:, :, 9:] = pixels(1, 8, seed=7)
    early = x.clone()
    early[:, :, 0] = 0.5
    with torch.no_grad():
        z, z_late, z_early = vae.encode(x), vae.encode(late), vae.encode(early)
        image = vae.encode(x[:, :, :1])
    assert torch.equal(z[:, :, :2], z_late[:, :, :2])
    assert (z[:, :, 2] - z_late[:, :, 2]).abs().max() > 1e-3
    assert torch.equal(z[:, :, 1:], z_early[:, :, 1:])
    assert (z[:, :, 0] - z_early[:, :, 0]).abs().max() > 1e-3
    torch.testing.assert_close(z[:, :, :1], image)  # frame 0 of a video == the image alone


def test_posterior_sampling_is_seeded(vae):
    x = pixels(1, 9)
    with torch.no_grad():
        mean = vae.encode(x)
        a = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(0))
        b = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(0))
        c = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert (a - mean).abs().max() > 1e-4 and (a - c).abs().max() > 1e-4


def test_decode_runs_frame_zero_alone_then_chunks_of_6(vae):
    z = torch.randn(1, 24, 9, 1, 1, generator=torch.Generator().manual_seed(0))  # chunks: [0], [1-6], [7-8]
    z_last = z.clone()
    z_last[:, :, 8] += 1.0
    z_first = z.clone()
    z_first[:, :, 1] += 1.0
    with torch.no_grad():
        out, out_last, out_first = (vae.decode(v) for v in (z, z_last, z_first))
        head = vae.decode(z[:, :, :1])
    assert out.shape[2] == 65
    assert torch.equal(out[:, :, :49], out_last[:, :, :49])  # frame 0 + latents 1-6
    assert (out[:, :, 49:] - out_last[:, :, 49:]).abs().max() > 1e-4
    assert torch.equal(out[:, :, :1], out_first[:, :, :1]) and torch.equal(
        out[:, :, 49:], out_first[:, :, 49:]
    )
    assert (out[:, :, 1:49] - out_first[:, :, 1:49]).abs().max() > 1e-4
    torch.testing.assert_close(out[:, :, :1], head)


def test_frame_batching_does_not_change_results():
    a, b = small_vae(frame_batch=1, group_batch=1), small_vae(frame_batch=64, group_batch=64)
    x = pixels(2, 17, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(a.encode(x), b.encode(x), rtol=1e-4, atol=1e-5)


def test_spatial_part_matches_diffusers_autoencoder_kl():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    vae = small_vae()
    prefix = "spatial_vae.module."
    ours = {k[len(prefix) :]: v for k, v in vae.state_dict().items() if k.startswith(prefix)}
    assert set(ours) == set(ref.state_dict())
    ref.load_state_dict(ours)
    x = pixels(1, 3, 16, 24)
    with torch.no_grad():
        h = ref.encoder.conv_in(x[:, :, 0])
        for block in ref.encoder.down_blocks:
            h = block(h)
        h = ref.encoder.mid_block(h) * 0.18215
        torch.testing.assert_close(vae.spatial_vae.encode(x)[:, :, 0], h, rtol=1e-4, atol=1e-5)
        feats = torch.randn(1, 32, 2, 2, 3)
        d = ref.decoder.mid_block(feats[:, :, 1] / 0.18215)
        for block in ref.decoder.up_blocks:
            d = block(d)
        d = ref.decoder.conv_out(ref.decoder.conv_act(ref.decoder.conv_norm_out(d)))
        torch.testing.assert_close(vae.spatial_vae.decode(feats)[:, :, 1], d, rtol=1e-4, atol=1e-5)

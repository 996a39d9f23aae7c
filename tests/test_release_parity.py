"""`mugv sample` on a tiny release-format model (dit.pt + vae.pt) against an independent
re-implementation, in this file, of the release pipeline's defaults (infer_pipeline.py and its
scheduler): negative prompt, aesthetic-score suffix, size tensors in the model dtype for the shift,
Pillow bicubic resize with a rounded crop offset, reference pixels as frame 0, chunked decode of
latents 1... Same seed, prompt and image. Known, deliberate differences kept out of the
comparison: the noise is drawn from a seeded CPU generator (the release: the global CUDA RNG) and
the reference latent is the posterior mean (the release: a posterior sample)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mugv.cli.main import main as cli
from mugv.text import T5TextEncoder, make_tiny_t5
from mugv.vae import VideoVAE, VideoVAEConfig
from tests.conftest import SMALL_VAE, tiny_model

NEGATIVE = (
    "ugly, blurry, lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, "
    "cropped, worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, username, blurry"
)
H, W, FRAMES, STEPS, SEED, TEXT_LEN = 16, 24, 17, 3, 5, 16


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    model = tiny_model(seed=3).eval()
    torch.save(model.state_dict(), root / "dit.pt")  # the release layout: a flat state dict
    t5 = make_tiny_t5(root / "t5", d_model=model.config.caption_channels, num_heads=2)
    torch.manual_seed(1)
    vae = VideoVAE(VideoVAEConfig(**SMALL_VAE)).eval()
    torch.save(vae.state_dict(), root / "vae.pt")
    (root / "vae.json").write_text(json.dumps({"kind": "video_vae", "config": SMALL_VAE}))
    # 40x50 -> cover 16x24: 19x24, crop offset round(1.5) = 2 (a floored offset would be 1)
    rgb = (np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(root / "ref.png")
    return dict(root=root, model=model, t5=t5, vae=vae, image=str(root / "ref.png"))


def release_reference_image(path, th, tw):
    """resize_crop_to_fill + ToTensor + Normalize(0.5, 0.5) of the release -> [3, th, tw]."""
    im = Image.open(path).convert("RGB")
    w, h = im.size
    rh, rw = th / h, tw / w
    if rh > rw:
        sh, sw = th, round(w * rh)
        i, j = 0, int(round((sw - tw) / 2.0))
    else:
        sh, sw = round(h * rw), tw
        i, j = int(round((sh - th) / 2.0)), 0
    arr = np.array(im.resize((sw, sh), Image.BICUBIC))[i : i + th, j : j + tw]
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0
    return (x - 0.5) / 0.5


def release_timesteps(dtype, latent_t, steps):
    """timestep_transform with height/width/num_frames tensors made in the model dtype."""
    height, width = torch.tensor([H], dtype=dtype), torch.tensor([W], dtype=dtype)
    num_frames = torch.tensor([latent_t], dtype=dtype)
    ratio = (height * width / (512 * 512)).sqrt() * (num_frames / 1).sqrt() * 1.0
    out = []
    for i in range(steps):
        tp = torch.tensor([(1.0 - i / steps) * 1000]) / 1000
        out.append(ratio * tp / (1 + (ratio - 1) * tp) * 1000)
    return out


def release_decode_tail(vae, z):
    """MUGVAE.decode(samples[:, :, 1:]): de-normalise, temporal decode in chunks of 6 latents
    (48 frames), then the 2D decoder frame by frame."""
    z = z * vae.scale.to(z.dtype) + vae.shift.to(z.dtype)
    feats = torch.cat([vae.temporal_vae.decode(z[:, :, i : i + 6]) for i in range(0, z.shape[2], 6)], 2)
    frames = [vae.spatial_vae.module.decoder(f / vae.spatial_vae.scaling_factor) for f in feats.unbind(2)]
    return torch.stack(frames, 2)


def release_encode_8(vae, img):
    """get_reference_vae_latent: the image repeated 8 times, one 8-frame group through the
    temporal encoder (its posterior mean here), normalised."""
    feats = vae.spatial_vae.module.encoder(img[None]) * vae.spatial_vae.scaling_factor  # [1, C, h, w]
    mean = vae.temporal_vae.moments(feats[:, :, None].repeat(1, 1, 8, 1, 1)).chunk(2, dim=1)[0]
    return (mean - vae.shift.to(mean.dtype)) / vae.scale.to(mean.dtype)


@torch.no_grad()
def release_pipeline(release, prompt, dtype):
    model = release["model"].to(dtype)
    vae = release["vae"].to(dtype)
    text = T5TextEncoder(release["t5"], max_length=TEXT_LEN, dtype=dtype)
    y, mask = text.encode([f"{prompt} aesthetic score: {6.0:.1f}.", NEGATIVE])
    ref_img = release_reference_image(release["image"], H, W)  # [3, H, W]
    ref_latent = release_encode_8(vae, ref_img.to(dtype))
    T = (FRAMES - 1) // 8 + 1
    z = torch.randn(1, 24, T, H // 8, W // 8, generator=torch.Generator().manual_seed(SEED))
    z[:, :, :1] = ref_latent.float()
    x_mask = torch.tensor([[False] + [True] * (T - 1)])
    ts = release_timesteps(dtype, T, STEPS)
    fps = torch.tensor([30.0], dtype=dtype)
    for i, t in enumerate(ts):
        x0 = z.clone()
        pred = model(torch.cat([z, z]), torch.cat([t, t]), y, mask, x_mask.repeat(2, 1),
                     torch.cat([fps, fps]).float(), torch.arange(T + 2)[None].repeat(2, 1))  # fmt: skip
        pred_cond, pred_uncond = pred.chunk(2, dim=1)[0].chunk(2, dim=0)
        v = pred_uncond + 4.0 * (pred_cond - pred_uncond)
        dt = (ts[i] - ts[i + 1] if i < len(ts) - 1 else ts[i]) / 1000
        z = z + v * dt[:, None, None, None, None]
        z = torch.where(x_mask[:, None, :, None, None], z, x0)
    tail = release_decode_tail(vae, z[:, :, 1:].to(dtype))
    video = torch.cat([ref_img[None, :, None].to(tail.dtype), tail], 2)[0]
    return video.float().clamp(-1, 1)


def sample(release, tmp_path, dtype, *extra):
    out = str(tmp_path / f"{dtype}_{len(extra)}.pt")
    r = release["root"]
    args = ["sample", "--model", str(r / "dit.pt"), "--t5", release["t5"], "--text-length", str(TEXT_LEN),
            "--vae", str(r / "vae.pt"), "--prompt", "a red ball", "--image", release["image"],
            "--frames", str(FRAMES), "--height", str(H), "--width", str(W), "--steps", str(STEPS),
            "--seed", str(SEED), "--dtype", dtype, "--out", out, *extra]  # fmt: skip
    assert cli(args) == 0
    return torch.load(out)


@pytest.mark.parametrize("dtype, atol", [("float32", 1e-5), ("bfloat16", 1e-6)])
def test_mugv_sample_equals_the_release_pipeline(release, tmp_path, dtype, atol):
    ours = sample(release, tmp_path, dtype)
    ref = release_pipeline(release, "a red ball", getattr(torch, dtype))
    assert ours.shape == ref.shape == (3, FRAMES, H, W)
    torch.testing.assert_close(ours, ref, rtol=0, atol=atol)
    assert torch.equal(ours[:, 0], ref[:, 0])  # the reference image's own pixels
    # each release default is load-bearing: switching it off moves the output past the tolerance
    switches = [["--negative-prompt", ""], ["--prompt-suffix", ""], ["--image-resample", "bilinear"],
                ["--decoded-first-frame"]] + [["--exact-shift-ratio"]] * (dtype == "bfloat16")  # fmt: skip
    for flags in switches:
        assert (sample(release, tmp_path, dtype, *flags) - ref).abs().max() > 5 * atol, flags

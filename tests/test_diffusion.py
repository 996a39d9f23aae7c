import math

import pytest
import torch
from conftest import tiny_model

from mugv.diffusion import (
    SamplerConfig,
    add_noise,
    euler_sample,
    flow_loss,
    sample_timesteps,
    sampling_schedule,
    shift_ratio,
    shift_sigma,
    velocity_target,
)


def test_shift_ratio_hand_values():
    # 1280x720 px, 14 latent frames: sqrt(1280*720/512^2) * sqrt(14) = 1.875 * 3.7416... = 7.0156...
    r = float(shift_ratio(720, 1280, 14))
    assert r == pytest.approx(1.875 * math.sqrt(14), rel=1e-6)
    assert r == pytest.approx(7.015607, abs=1e-5)
    assert float(shift_ratio(512, 512, 1)) == pytest.approx(1.0)
    s = torch.tensor([0.0, 0.25, 0.5, 1.0])
    torch.testing.assert_close(shift_sigma(s, 3.0), torch.tensor([0.0, 0.5, 0.75, 1.0]))


def test_training_timesteps_logit_normal_and_shifted():
    g = torch.Generator().manual_seed(0)
    t1 = sample_timesteps(torch.ones(20000), g)
    assert 0 < float(t1.min()) and float(t1.max()) < 1000
    assert float(t1.median()) == pytest.approx(500, abs=15)  # sigmoid(N(0,1)) has median 0.5
    g = torch.Generator().manual_seed(0)
    t7 = sample_timesteps(torch.full((20000,), 7.0), g)
    torch.testing.assert_close(t7, 1000 * shift_sigma(t1 / 1000, 7.0))
    assert float(t7.median()) == pytest.approx(1000 * 7 * 0.5 / (1 + 6 * 0.5), abs=10)


def test_interpolation_target_and_masked_loss():
    x0 = torch.randn(2, 24, 3, 2, 2)
    eps = torch.randn_like(x0)
    t = torch.tensor([250.0, 1000.0])
    x_mask = torch.tensor([[True, True, True], [False, True, True]])
    xt = add_noise(x0, eps, t, x_mask)
    torch.testing.assert_close(xt[0], 0.75 * x0[0] + 0.25 * eps[0])
    torch.testing.assert_close(xt[1, :, 1:], eps[1, :, 1:])
    torch.testing.assert_close(xt[1, :, :1], x0[1, :, :1])  # clean I2V frame untouched
    v = velocity_target(x0, eps)
    pred = torch.cat([v, torch.randn_like(v)], 1)  # channels 24..47 are ignored
    pred[:, :24, 0] += 1.0  # error 1 everywhere in frame 0
    loss = flow_loss(pred, v, x_mask)
    torch.testing.assert_close(loss, torch.tensor([1.0 / 3.0, 0.0]))  # sample 1's frame 0 is not counted
    torch.testing.assert_close(flow_loss(pred, v), torch.tensor([1.0 / 3.0, 1.0 / 3.0]))


def test_schedule_endpoints():
    ts = sampling_schedule(4, 1.0)
    assert ts == pytest.approx([1000, 750, 500, 250, 0])
    ts = sampling_schedule(25, 7.0)
    assert ts[0] == pytest.approx(1000) and ts[-1] == 0 and all(a > b for a, b in zip(ts, ts[1:]))


def test_euler_integrates_constant_velocity_and_cfg_combination():
    noise = torch.randn(2, 24, 2, 4, 4)
    c_val, u_val = 0.3, -0.1

    def model(x, t, y, mask, x_mask, fps, fi):
        # velocity = 0.3 for the prompt (y > 0), -0.1 for the negative prompt (y < 0)
        v = torch.where(y[:, 0, 0, 0] > 0, c_val, u_val).view(-1, 1, 1, 1, 1)
        return v.expand(x.shape[0], 48, *x.shape[2:])

    y, mask = torch.ones(2, 1, 3, 8), torch.ones(2, 3, dtype=torch.bool)
    yn, mn = -torch.ones(1, 1, 5, 8), torch.ones(1, 5, dtype=torch.bool)
    out = euler_sample(model, noise, y, mask, cfg=SamplerConfig(num_steps=5))
    torch.testing.assert_close(out, noise + c_val)  # sum of step sizes is exactly 1
    out = euler_sample(model, noise, y, mask, yn, mn, cfg=SamplerConfig(num_steps=5, guidance_scale=4.0))
    torch.testing.assert_close(out, noise + u_val + 4.0 * (c_val - u_val))


def test_t2v_and_i2v_sampling_with_tiny_model():
    model = tiny_model(caption_channels=32)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 24, 3, 4, 6, generator=g)
    y, mask = torch.randn(1, 1, 5, 32, generator=g), torch.ones(1, 5, dtype=torch.bool)
    yn, mn = torch.randn(1, 1, 5, 32, generator=g), torch.ones(1, 5, dtype=torch.bool)
    cfg = SamplerConfig(num_steps=3)
    t2v = euler_sample(model, noise, y, mask, yn, mn, cfg=cfg)
    assert t2v.shape == noise.shape and torch.isfinite(t2v).all()
    ref = torch.randn(1, 24, 1, 4, 6, generator=g)
    i2v = euler_sample(model, noise, y, mask, yn, mn, cfg=cfg, cond_frame=ref)
    assert torch.equal(i2v[:, :, :1], ref)  # bit-identical first frame
    assert not torch.allclose(i2v[:, :, 1:], t2v[:, :, 1:])  # and it conditions the rest


def test_shift_ratio_in_the_model_dtype_as_the_release():
    from mugv.diffusion import latent_ratio, schedule_ratio

    assert float(shift_ratio(720, 1280, 14, torch.bfloat16)) == 7.0
    assert float(shift_ratio(720, 1280, 10, torch.bfloat16)) == 5.90625
    cfg = SamplerConfig()
    assert schedule_ratio(cfg, (14, 90, 160), torch.bfloat16) == 7.0
    assert schedule_ratio(cfg, (14, 90, 160), torch.float32) == pytest.approx(7.015607, abs=1e-5)
    exact = SamplerConfig(ratio_in_model_dtype=False)
    assert schedule_ratio(exact, (14, 90, 160), torch.bfloat16) == latent_ratio((14, 90, 160))
    gap = max(abs(a - b) for a, b in zip(sampling_schedule(25, 7.0), sampling_schedule(25, latent_ratio((14, 90, 160)))))
    assert 0.5 < gap < 0.6  # the "up to 0.56 of 1000"

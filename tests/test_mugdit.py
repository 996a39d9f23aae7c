import json
import os

import pytest
import torch
from conftest import TINY, mixed_batch, tiny_model
from reference_mugdit import reference_forward

from mugv.models import MUGDiT, MUGDiTConfig
from mugv.models.layout import TokenLayout
from mugv.models.mugdit import MUGDiTBlock, unpatchify
from mugv.models.rope import apply_rope, rope_angles


def rel_err(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def test_matches_independent_reference():
    model = tiny_model()
    batch = mixed_batch(model.config)
    with torch.no_grad():
        out = model(**batch)
    ref = reference_forward(model.state_dict(), model.config.num_heads, *batch.values())
    assert out.dtype == torch.float32 and out.shape == (3, 48, 3, 5, 6)
    assert rel_err(out, ref) < 1e-5


def test_t2v_default_equals_all_frames_denoised():
    model = tiny_model()
    b = mixed_batch(model.config)
    with torch.no_grad():
        a = model(b["x"], b["timestep"], b["y"], b["mask"])
        c = model(b["x"], b["timestep"], b["y"], b["mask"], x_mask=torch.ones(3, 3, dtype=torch.bool),
                  fps=torch.full((3,), 30.0), frame_indices=torch.arange(5).repeat(3, 1))
    torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_i2v_changes_conditioned_output_and_text_padding_is_ignored():
    model = tiny_model()
    b = mixed_batch(model.config)
    with torch.no_grad():
        base = model(**b)
        b2 = dict(b, y=b["y"].clone())
        b2["y"][1, :, -2:] = 1e3  # garbage in padded text positions of sample 1
        torch.testing.assert_close(model(**b2), base, rtol=0, atol=0)
        b3 = dict(b, x_mask=torch.ones(3, 3, dtype=torch.bool))
        assert rel_err(model(**b3)[1], base[1]) > 1e-3


def test_token_positions_of_start_end_and_axes():
    lay = TokenLayout(T=2, Hp=3, Wp=4)
    fi = torch.tensor([[10, 11, 12, 13]])
    pos = lay.positions(fi)[0]  # [N, 3] as (t, h, w)
    assert pos.shape == (2 * 12 + 2, 3)
    assert pos[0].tolist() == [10, 0, 0]  # start: frame_indices[0], h=0, w=0
    assert pos[-1].tolist() == [13, 2, 3]  # end: frame_indices[T+1], h=Hp-1, w=Wp-1
    assert pos[1].tolist() == [11, 0, 0]  # first video token: latent frame 0 -> frame_indices[1]
    n = 1 + 1 * 12 + 2 * 4 + 3  # frame 1, row 2, column 3
    assert pos[n].tolist() == [12, 2, 3]
    shard = lay.shard(5, 17).positions(fi)[0]
    torch.testing.assert_close(shard, pos[5:17])


def test_rope_axes_hit_their_channel_thirds():
    D = 36
    x = torch.randn(1, 1, 1, D)
    for axis, part in [(1, 0), (2, 1), (0, 2)]:  # (t,h,w) index -> channel third [h|w|t]
        pos = torch.zeros(1, 1, 3, dtype=torch.long)
        pos[..., axis] = 7
        y = apply_rope(x, rope_angles(pos, D))
        changed = (y - x).abs().reshape(3, D // 3).sum(1) > 1e-6
        assert changed.tolist() == [i == part for i in range(3)]
    # interleaved pairs: channel pair (0, 1) is rotated by angle pos * f_0 = 7 (f_0 = 1)
    pos = torch.tensor([[[0, 7, 0]]])
    y = apply_rope(x, rope_angles(pos, D))[0, 0, 0]
    c, s = torch.cos(torch.tensor(7.0)), torch.sin(torch.tensor(7.0))
    x0, x1 = x[0, 0, 0, 0], x[0, 0, 0, 1]
    torch.testing.assert_close(y[:2], torch.stack([x0 * c - x1 * s, x0 * s + x1 * c]))
    # temporal positions clamp at 479
    p1, p2 = torch.tensor([[[479, 0, 0]]]), torch.tensor([[[600, 0, 0]]])
    torch.testing.assert_close(rope_angles(p1, D), rope_angles(p2, D))


def test_modulation_chunk_order():
    """Rows (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp): zeroing the two gates
    (rows 2 and 5) must leave only the ungated cross-attention residual."""
    cfg = MUGDiTConfig(**TINY)
    block = MUGDiTBlock(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        block.scale_shift_table.normal_()
        block.scale_shift_table[2] = 0
        block.scale_shift_table[5] = 0
    lay = TokenLayout(1, 2, 2)
    x = torch.randn(1, lay.N, cfg.hidden_size)
    text = torch.randn(1, 3, cfg.hidden_size)
    rope = torch.zeros(1, 1, lay.N, cfg.head_dim // 2)
    frame_mod = torch.zeros(1, 2, 6 * cfg.hidden_size)
    with torch.no_grad():
        out = block(x, frame_mod, lay, rope, text, None)
        expect = x + block.cross_attn(block.cross_attn_norm(x), text, None)
        torch.testing.assert_close(out, expect)
        block.scale_shift_table[1] = 5.0  # a scale row with the gates still zero: no effect either
        torch.testing.assert_close(block(x, frame_mod, lay, rope, text, None), expect)
        block.scale_shift_table[2] = 1.0  # open the attention gate: now it matters
        assert (block(x, frame_mod, lay, rope, text, None) - expect).abs().max() > 1e-3


def test_unpatchify_channel_order():
    T, Hp, Wp, c = 2, 2, 3, 5
    tok = torch.zeros(1, T * Hp * Wp, 4 * c)
    for n in range(T * Hp * Wp):
        for ph in range(2):
            for pw in range(2):
                for ch in range(c):
                    tok[0, n, (ph * 2 + pw) * c + ch] = n * 1000 + ph * 100 + pw * 10 + ch
    out = unpatchify(tok, T, Hp, Wp, c)
    assert out.shape == (1, c, T, 2 * Hp, 2 * Wp)
    t, h, w, ch = 1, 3, 4, 2  # pixel (3, 4) -> patch (1, 2), sub-position (1, 0)
    n = t * Hp * Wp + 1 * Wp + 2
    assert out[0, ch, t, h, w] == n * 1000 + 1 * 100 + 0 * 10 + ch


def test_odd_sizes_pad_and_crop():
    model = tiny_model()
    for H, W in [(1, 1), (3, 4), (4, 7)]:
        x = torch.randn(1, 24, 2, H, W)
        with torch.no_grad():
            out = model(x, torch.tensor([500.0]), torch.randn(1, 1, 4, 32))
        assert out.shape == (1, 48, 2, H, W)


def test_bad_inputs_fail_clearly():
    model = tiny_model()
    x = torch.randn(2, 24, 2, 4, 4)
    y = torch.randn(2, 1, 4, 32)
    with pytest.raises(ValueError, match="no valid text token"):
        model(x, torch.ones(2), y, mask=torch.tensor([[True] * 4, [False] * 4]))
    with pytest.raises(ValueError, match="frame_indices"):
        model(x, torch.ones(2), y, frame_indices=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible"):
        MUGDiTConfig(hidden_size=72, num_heads=5)
    with pytest.raises(ValueError, match="preset"):
        MUGDiTConfig.from_preset("mugdit_3b")


def test_release_dit_pt_round_trip(tmp_path):
    model = tiny_model()
    path = tmp_path / "dit.pt"
    model.export_release(str(path))
    sd = torch.load(path, weights_only=True)
    assert set(sd) == set(model.state_dict()) and all(isinstance(v, torch.Tensor) for v in sd.values())
    plain = MUGDiT(MUGDiTConfig(**TINY))
    plain.load_state_dict(sd, strict=True)
    loaded = MUGDiT.from_release(str(path), MUGDiTConfig(**TINY))
    b = mixed_batch(model.config)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**b), model(**b), rtol=0, atol=0)
    sd["extra"] = torch.zeros(1)
    torch.save(sd, path)
    with pytest.raises(RuntimeError, match="extra"):
        MUGDiT.from_release(str(path), MUGDiTConfig(**TINY))


def test_safetensors_round_trip_sharded(tmp_path):
    model = tiny_model()
    model.save_pretrained(str(tmp_path / "one"))
    assert sorted(os.listdir(tmp_path / "one")) == ["config.json", "model.safetensors"]
    model.save_pretrained(str(tmp_path / "many"), max_shard_bytes=200_000)
    files = sorted(os.listdir(tmp_path / "many"))
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 1
    with open(tmp_path / "many" / "config.json") as f:
        assert json.load(f)["hidden_size"] == 72
    for d in ["one", "many"]:
        loaded = MUGDiT.from_pretrained(str(tmp_path / d))
        for k, v in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v), k


def test_presets_on_meta_device():
    with torch.device("meta"):
        m = MUGDiT(MUGDiTConfig.from_preset("mugdit_10b"))
    sd = m.state_dict()
    assert len(sd) == 1197
    assert sum(p.numel() for p in m.parameters()) == 10_830_321_984
    C, D = 3456, 72
    per_block = sum(p.numel() for p in m.blocks[0].parameters())
    assert per_block == 16 * C * C + 21 * C + 4 * D == 191_175_840
    assert sum(p.numel() for p in m.parameters()) - 56 * per_block == 124_474_944
    assert sd["blocks.3.attn.qkv.weight"].shape == (3 * C, C)
    assert sd["x_embedder.proj.weight"].shape == (C, 24, 1, 2, 2)
    assert sd["final_layer.linear.weight"].shape == (192, C)

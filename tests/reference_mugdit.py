"""An independent, deliberately naive implementation of SPEC section 2, used only by tests.

It works on a release-layout state dict in float64, materialises the per-token modulation,
builds RoPE positions with Python loops and rotates with complex numbers, and writes
attention as an explicit softmax -- none of it shares code with mugv.models.
"""

import math

import torch
import torch.nn.functional as F


def _lin(sd, name, x):
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def _ln(x, eps=1e-6):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps)


def _rms(x, w, eps=1e-6):
    return x / torch.sqrt((x**2).mean(-1, keepdim=True) + eps) * w


def _temb(sd, prefix, t):
    k = torch.arange(128, dtype=torch.float64)
    f = torch.exp(-math.log(10000.0) * k / 128)
    a = t.double()[:, None] * f
    h = torch.cat([torch.cos(a), torch.sin(a)], -1)
    h = _lin(sd, f"{prefix}.mlp.0", h)
    return _lin(sd, f"{prefix}.mlp.2", h * torch.sigmoid(h))


def _attention(q, k, v, key_ok=None):
    # q [B, H, Nq, D], k/v [B, H, Nk, D]
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if key_ok is not None:
        s = s.masked_fill(~key_ok[:, None, None, :], float("-inf"))
    return torch.softmax(s, -1) @ v


def reference_forward(state_dict, num_heads, x, t, y, mask, x_mask, fps, frame_indices):
    sd = {k: v.double() for k, v in state_dict.items()}
    B, Cin, T, H, W = x.shape
    C = sd["start_token"].shape[0]
    D = C // num_heads
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    x = x.double()
    # patchify by hand: zero pad, cut 1x2x2 patches, flatten in conv-weight order (c, kt, kh, kw)
    Hp, Wp = (H + 1) // 2, (W + 1) // 2
    xp = F.pad(x, (0, 2 * Wp - W, 0, 2 * Hp - H))
    patches = xp.reshape(B, Cin, T, Hp, 2, Wp, 2).permute(0, 2, 3, 5, 1, 4, 6).reshape(B, T * Hp * Wp, Cin * 4)
    tok = patches @ sd["x_embedder.proj.weight"].reshape(C, -1).T + sd["x_embedder.proj.bias"]
    seq = torch.cat([sd["start_token"].expand(B, 1, C), tok, sd["end_token"].expand(B, 1, C)], 1)
    N = seq.shape[1]
    # which tokens are "noisy" (use t) vs conditioning/edge tokens (use t=0)
    noisy = torch.zeros(B, N, dtype=torch.bool)
    for b in range(B):
        for n in range(1, N - 1):
            noisy[b, n] = bool(x_mask[b, (n - 1) // (Hp * Wp)])
    fe = _temb(sd, "fps_embedder", fps.double())
    e = _temb(sd, "t_embedder", t.double()) + fe
    e0 = _temb(sd, "t_embedder", torch.zeros(B, dtype=torch.float64)) + fe

    def tblock(z):
        return _lin(sd, "t_block.1", z * torch.sigmoid(z))

    mod = torch.where(noisy[..., None], tblock(e)[:, None], tblock(e0)[:, None])  # [B, N, 6C]
    emb = torch.where(noisy[..., None], e[:, None], e0[:, None])  # [B, N, C]
    # text
    yy = y.double().reshape(B, -1, y.shape[-1])
    yy = _lin(sd, "y_embedder.y_proj.fc1", _ln(yy))
    yy = _ln(_lin(sd, "y_embedder.y_proj.fc2", F.gelu(yy, approximate="tanh")))
    # RoPE: per-token (t, h, w)
    pos = torch.zeros(B, N, 3, dtype=torch.float64)
    for b in range(B):
        pos[b, 0] = torch.tensor([min(int(frame_indices[b, 0]), 479), 0, 0])
        pos[b, N - 1] = torch.tensor([min(int(frame_indices[b, T + 1]), 479), Hp - 1, Wp - 1])
        for n in range(1, N - 1):
            fr, r = divmod(n - 1, Hp * Wp)
            pos[b, n] = torch.tensor([min(int(frame_indices[b, fr + 1]), 479), r // Wp, r % Wp])
    freqs = torch.tensor([10000.0 ** (-6.0 * j / D) for j in range(D // 6)], dtype=torch.float64)
    ang = torch.cat([pos[..., 1:2] * freqs, pos[..., 2:3] * freqs, pos[..., 0:1] * freqs], -1)  # [B, N, D/2]
    rot = torch.polar(torch.ones_like(ang), ang)[:, None]  # [B, 1, N, D/2]

    def rope(z):  # [B, H, N, D]
        zc = torch.view_as_complex(z.reshape(*z.shape[:-1], D // 2, 2).contiguous())
        return torch.view_as_real(zc * rot).reshape(z.shape)

    def heads(z):
        return z.reshape(B, z.shape[1], num_heads, D).transpose(1, 2)

    h = seq
    for i in range(depth):
        p = f"blocks.{i}"
        m = mod.reshape(B, N, 6, C) + sd[f"{p}.scale_shift_table"]
        sh1, sc1, g1, sh2, sc2, g2 = [m[:, :, j] for j in range(6)]
        a = _ln(h) * (1 + sc1) + sh1
        qkv = _lin(sd, f"{p}.attn.qkv", a)
        q, k, v = qkv[..., :C], qkv[..., C : 2 * C], qkv[..., 2 * C :]
        q = rope(_rms(heads(q), sd[f"{p}.attn.q_norm.weight"]))
        k = rope(_rms(heads(k), sd[f"{p}.attn.k_norm.weight"]))
        o = _attention(q, k, heads(v)).transpose(1, 2).reshape(B, N, C)
        h = h + g1 * _lin(sd, f"{p}.attn.proj", o)
        c = _ln(h) * sd[f"{p}.cross_attn_norm.weight"] + sd[f"{p}.cross_attn_norm.bias"]
        q = _rms(heads(_lin(sd, f"{p}.cross_attn.q_linear", c)), sd[f"{p}.cross_attn.q_norm.weight"])
        kv = _lin(sd, f"{p}.cross_attn.kv_linear", yy)
        k = _rms(heads(kv[..., :C]), sd[f"{p}.cross_attn.k_norm.weight"])
        o = _attention(q, k, heads(kv[..., C:]), None if mask is None else mask.bool())
        h = h + _lin(sd, f"{p}.cross_attn.proj", o.transpose(1, 2).reshape(B, N, C))
        a = _ln(h) * (1 + sc2) + sh2
        h = h + g2 * _lin(sd, f"{p}.mlp.fc2", F.gelu(_lin(sd, f"{p}.mlp.fc1", a), approximate="tanh"))
    fm = emb[:, :, None] + sd["final_layer.scale_shift_table"]
    out = _lin(sd, "final_layer.linear", _ln(h) * (1 + fm[:, :, 1]) + fm[:, :, 0])[:, 1:-1]  # [B, T*S, 192]
    cout = out.shape[-1] // 4
    out = out.reshape(B, T, Hp, Wp, 1, 2, 2, cout).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return out.reshape(B, cout, T, 2 * Hp, 2 * Wp)[..., :H, :W]

"""MUGDiT in plain PyTorch, in the release's (Hugging Face-format) parameter layout.

This is the single-device reference model: its `state_dict()` is exactly the release
`dit.pt` layout of SPEC section 3, and every parallel model in mugv is checked against it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from mugv.models.layout import TokenLayout, apply_per_frame, frame_table
from mugv.models.rope import apply_rope, rope_angles
from mugv.utils.checkpoint_io import (
    load_release_state_dict,
    load_safetensors_dir,
    save_safetensors_sharded,
    save_torch_atomic,
    write_json_atomic,
)

PATCH = (1, 2, 2)


@dataclass
class MUGDiTConfig:
    """Architecture of a MUGDiT. Defaults are the 10B model of the release."""

    hidden_size: int = 3456
    depth: int = 56
    num_heads: int = 48
    in_channels: int = 24
    out_channels: int = 48
    caption_channels: int = 4096
    mlp_ratio: int = 4
    frequency_embedding_size: int = 256
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_max_hw: int = 384
    rope_max_t: int = 480

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 6:
            raise ValueError(f"head dim {self.head_dim} must be a multiple of 6 (3D RoPE)")
        if self.frequency_embedding_size % 2:
            raise ValueError("frequency_embedding_size must be even")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_out(self) -> int:
        return math.prod(PATCH) * self.out_channels

    @classmethod
    def from_preset(cls, name: str) -> MUGDiTConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown MUGDiT preset {name!r}; known: {sorted(PRESETS)}")
        return cls(**PRESETS[name])

    @classmethod
    def from_dict(cls, d: dict) -> MUGDiTConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown MUGDiTConfig keys {unknown}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, dict] = {
    "mugdit_tiny": dict(hidden_size=72, depth=2, num_heads=2, caption_channels=64),
    "mugdit_1b": dict(hidden_size=1152, depth=56, num_heads=16),
    "mugdit_4b": dict(hidden_size=2304, depth=56, num_heads=32),
    "mugdit_10b": dict(hidden_size=3456, depth=56, num_heads=48),
    "mugdit_18b": dict(hidden_size=4608, depth=56, num_heads=64),
}


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


def timestep_sinusoid(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """[B] -> [B, dim] fp32 as [cos(t f) | sin(t f)], f_k = exp(-ln(max_period) k / (dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """Sinusoid -> Linear -> SiLU -> Linear. Used for the diffusion timestep and for fps."""

    def __init__(self, hidden_size: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_sinusoid(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class PatchEmbed3D(nn.Module):
    """Conv3d patchify with kernel = stride = (1, 2, 2); H, W zero-padded on the far side to even."""

    def __init__(self, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=PATCH, stride=PATCH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        x = F.pad(x, (0, (-W) % PATCH[2], 0, (-H) % PATCH[1]))
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, C, T, Hp, Wp] -> [B, T*Hp*Wp, C]


class CaptionProjection(nn.Module):
    def __init__(self, caption_channels: int, hidden_size: int):
        super().__init__()
        self.fc1 = nn.Linear(caption_channels, hidden_size)
        self.fc2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(y), approximate="tanh"))


class CaptionEmbedder(nn.Module):
    """LayerNorm(Ct) -> Linear -> GELU(tanh) -> Linear -> LayerNorm(C); both norms without affine."""

    def __init__(self, caption_channels: int, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.y_proj = CaptionProjection(caption_channels, hidden_size)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(y, y.shape[-1:], eps=self.eps)
        y = self.y_proj(y)
        return F.layer_norm(y, y.shape[-1:], eps=self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim: normalised in fp32, cast back to x's dtype, then scaled by weight
    (the release's order of operations, which matters under bf16)."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class HeadRMSNorm(nn.Module):
    """QK-norm: RMSNorm over the head dim with one weight shared by all heads."""

    def __init__(self, head_dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B, H, Nq, D] x [B, H, Nk, D] -> [B, H, Nq, D]; key_mask [B, Nk] bool (True = attend)."""
    mask = None if key_mask is None else key_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class SelfAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        head_dim = hidden_size // num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.q_norm = HeadRMSNorm(head_dim, eps)
        self.k_norm = HeadRMSNorm(head_dim, eps)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # [3, B, H, N, D]
        q, k, v = qkv.unbind(0)
        q = apply_rope(self.q_norm(q), rope)
        k = apply_rope(self.k_norm(k), rope)
        out = sdpa(q, k, v)  # [B, H, N, D]
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class CrossAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        head_dim = hidden_size // num_heads
        self.q_linear = nn.Linear(hidden_size, hidden_size)
        self.kv_linear = nn.Linear(hidden_size, 2 * hidden_size)
        self.q_norm = HeadRMSNorm(head_dim, eps)
        self.k_norm = HeadRMSNorm(head_dim, eps)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None) -> torch.Tensor:
        B, N, C = x.shape
        q = self.q_linear(x).view(B, N, self.num_heads, -1).transpose(1, 2)  # [B, H, N, D]
        kv = self.kv_linear(text).view(B, -1, 2, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)  # [B, H, Lt, D]
        q, k = self.q_norm(q), self.k_norm(k)
        out = sdpa(q, k, v, text_mask)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class MLP(nn.Module):
    def __init__(self, hidden_size: int, ratio: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, ratio * hidden_size)
        self.fc2 = nn.Linear(ratio * hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def _modulate(z, shift, scale):
    return z * (1 + scale) + shift


def _gate(z, gate):
    return z * gate


class MUGDiTBlock(nn.Module):
    def __init__(self, cfg: MUGDiTConfig):
        super().__init__()
        C = cfg.hidden_size
        self.eps = cfg.norm_eps
        self.scale_shift_table = nn.Parameter(torch.randn(6, C) / C**0.5)
        self.attn = SelfAttention(C, cfg.num_heads, cfg.norm_eps)
        self.cross_attn_norm = nn.LayerNorm(C, eps=cfg.norm_eps)
        self.cross_attn = CrossAttention(C, cfg.num_heads, cfg.norm_eps)
        self.mlp = MLP(C, cfg.mlp_ratio)

    def forward(self, x, frame_mod, layout, rope, text, text_mask):
        """x [B, N, C]; frame_mod [B, T+1, 6C] (adaLN-single output per frame, row T for start/end)."""
        B, F1, _ = frame_mod.shape
        mods = (self.scale_shift_table[None, None] + frame_mod.view(B, F1, 6, -1)).unbind(2)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods  # each [B, T+1, C]
        ln = lambda z: F.layer_norm(z, z.shape[-1:], eps=self.eps)
        h = apply_per_frame(ln(x), layout, _modulate, shift_msa, scale_msa)
        x = x + apply_per_frame(self.attn(h, rope), layout, _gate, gate_msa)
        x = x + self.cross_attn(self.cross_attn_norm(x), text, text_mask)
        h = apply_per_frame(ln(x), layout, _modulate, shift_mlp, scale_mlp)
        return x + apply_per_frame(self.mlp(h), layout, _gate, gate_mlp)


class FinalLayer(nn.Module):
    def __init__(self, cfg: MUGDiTConfig):
        super().__init__()
        C = cfg.hidden_size
        self.eps = cfg.norm_eps
        self.scale_shift_table = nn.Parameter(torch.randn(2, C) / C**0.5)
        self.linear = nn.Linear(C, cfg.patch_out)

    def forward(self, x, frame_emb, layout, seq_dim: int = 1):
        """x [B, n, C] with frame_emb [B, T+1, C] (seq_dim=1), or [n, B, C] with [T+1, B, C] (seq_dim=0)."""
        shift, scale = (self.scale_shift_table + frame_emb.unsqueeze(-2)).unbind(-2)
        h = F.layer_norm(x, x.shape[-1:], eps=self.eps)
        return self.linear(apply_per_frame(h, layout, _modulate, shift, scale, seq_dim=seq_dim))


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class MUGDiT(nn.Module):
    def __init__(self, config: MUGDiTConfig):
        super().__init__()
        self.config = cfg = config
        C = cfg.hidden_size
        self.start_token = nn.Parameter(torch.randn(C) * 0.02)
        self.end_token = nn.Parameter(torch.randn(C) * 0.02)
        self.x_embedder = PatchEmbed3D(cfg.in_channels, C)
        self.t_embedder = TimestepEmbedder(C, cfg.frequency_embedding_size)
        self.fps_embedder = TimestepEmbedder(C, cfg.frequency_embedding_size)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        self.y_embedder = CaptionEmbedder(cfg.caption_channels, C, cfg.norm_eps)
        self.blocks = nn.ModuleList(MUGDiTBlock(cfg) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.start_token.dtype

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        y: torch.Tensor,
        mask: torch.Tensor | None = None,
        x_mask: torch.Tensor | None = None,
        fps: torch.Tensor | None = None,
        frame_indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, Cin, T, H, W], timestep [B] (0..1000), y [B, 1, Lt, Ct] or [B, Lt, Ct], mask [B, Lt]
        bool, x_mask [B, T] bool (True = denoised), fps [B], frame_indices [B, T+2].
        Returns fp32 [B, Cout, T, H, W]."""
        cfg, dt = self.config, self.dtype
        B, _, T, H, W = x.shape
        Hp, Wp = -(-H // PATCH[1]), -(-W // PATCH[2])
        layout = TokenLayout(T, Hp, Wp)
        x_mask, fps, frame_indices = default_conditioning(x, x_mask, fps, frame_indices)
        # 1. cast inputs to the parameter dtype (under bf16 the timestep is rounded first)
        x, timestep, y = x.to(dt), timestep.to(dt), y.to(dt)
        if y.dim() == 4:
            y = y.squeeze(1)  # [B, 1, Lt, Ct] -> [B, Lt, Ct]
        text_mask = None if mask is None or bool(mask.all()) else mask.bool()
        if text_mask is not None and not bool(text_mask.any(1).all()):
            raise ValueError("a sample has no valid text token (mask all False); encode at least EOS")
        # 2-3. patchify and frame the sequence: [start, T*S video tokens, end]
        tokens = self.x_embedder(x)  # [B, T*S, C]
        edge = lambda p: p.to(dt).view(1, 1, -1).expand(B, 1, -1)
        h = torch.cat([edge(self.start_token), tokens, edge(self.end_token)], dim=1)  # [B, N, C]
        # 4-5. timestep (+fps) embeddings and the shared adaLN projection, per frame
        fps_emb = self.fps_embedder(fps)  # fps is not cast: its sinusoid is taken in fp32
        e = self.t_embedder(timestep) + fps_emb  # [B, C]
        e0 = self.t_embedder(torch.zeros_like(timestep)) + fps_emb
        frame_emb = frame_table(x_mask, e, e0)  # [B, T+1, C]
        frame_mod = frame_table(x_mask, self.t_block(e), self.t_block(e0))  # [B, T+1, 6C]
        # 6. text
        text = self.y_embedder(y)  # [B, Lt, C]
        # 7. rotary angles of every token, shared by all blocks
        pos = layout.positions(frame_indices)  # [B, N, 3]
        rope = rope_angles(pos, cfg.head_dim, cfg.rope_theta, cfg.rope_max_t, cfg.rope_max_hw)[:, None]
        # 8. transformer blocks
        for block in self.blocks:
            h = block(h, frame_mod, layout, rope, text, text_mask)
        # 9. final layer, drop start/end, unpatchify
        out = self.final_layer(h, frame_emb, layout)[:, 1:-1]  # [B, T*S, 4*Cout]
        return unpatchify(out, T, Hp, Wp, cfg.out_channels)[..., :H, :W].float()

    # -- checkpoints ---------------------------------------------------------------------------

    def save_pretrained(self, directory: str, max_shard_bytes: int = 5 * 2**30) -> None:
        """Write config.json and the weights as safetensors (sharded with an index if large)."""
        os.makedirs(directory, exist_ok=True)
        save_safetensors_sharded(self.state_dict().items(), directory, max_shard_bytes)
        write_json_atomic(os.path.join(directory, CONFIG_NAME), {"model_type": "mugdit", **self.config.to_dict()})

    @classmethod
    def from_pretrained(cls, directory: str, device: str | torch.device = "cpu") -> MUGDiT:
        config = load_pretrained_config(directory)
        return cls.from_state_dict(config, load_safetensors_dir(directory), device)

    @classmethod
    def from_release(cls, path: str, config: MUGDiTConfig, device: str | torch.device = "cpu") -> MUGDiT:
        """Load a release-format `dit.pt` (strict: exactly the release keys and shapes)."""
        return cls.from_state_dict(config, load_release_state_dict(path), device)

    @classmethod
    def from_state_dict(cls, config: MUGDiTConfig, state_dict: dict, device: str | torch.device = "cpu") -> MUGDiT:
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(state_dict, strict=True, assign=True)
        return model.to(device)

    def export_release(self, path: str) -> None:
        """Write the release `dit.pt`: a flat dict of contiguous CPU tensors, nothing else."""
        save_torch_atomic({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, path)


CONFIG_NAME = "config.json"


def load_pretrained_config(directory: str) -> MUGDiTConfig:
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory}: no {CONFIG_NAME}")
    return read_config_json(path)


def read_config_json(path: str) -> MUGDiTConfig:
    """A JSON file of MUGDiTConfig fields (an HF config.json with model_type "mugdit" too)."""
    with open(path) as f:
        d = json.load(f)
    if d.pop("model_type", "mugdit") != "mugdit":
        raise ValueError(f"{path}: model_type is not 'mugdit'")
    try:
        return MUGDiTConfig.from_dict(d)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from None


def default_conditioning(x, x_mask=None, fps=None, frame_indices=None):
    """Fill in text-to-video defaults: all frames denoised, 30 fps, frame indices 0..T+1."""
    B, T = x.shape[0], x.shape[2]
    if x_mask is None:
        x_mask = torch.ones(B, T, dtype=torch.bool, device=x.device)
    if fps is None:
        fps = torch.full((B,), 30.0, device=x.device)
    if frame_indices is None:
        frame_indices = torch.arange(T + 2, device=x.device).expand(B, -1)
    if x_mask.shape != (B, T):
        raise ValueError(f"x_mask must be [B, T] = {[B, T]}, got {list(x_mask.shape)}")
    if frame_indices.shape != (B, T + 2):
        raise ValueError(f"frame_indices must be [B, T+2] = {[B, T + 2]}, got {list(frame_indices.shape)}")
    return x_mask.bool(), fps, frame_indices


def unpatchify(tokens: torch.Tensor, T: int, Hp: int, Wp: int, channels: int) -> torch.Tensor:
    """[B, T*Hp*Wp, (pt ph pw c)] -> [B, c, T*pt, Hp*ph, Wp*pw], c fastest in the token vector."""
    B = tokens.shape[0]
    pt, ph, pw = PATCH
    x = tokens.view(B, T, Hp, Wp, pt, ph, pw, channels)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, c, T, pt, Hp, ph, Wp, pw]
    return x.reshape(B, channels, T * pt, Hp * ph, Wp * pw)

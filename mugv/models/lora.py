"""LoRA adapters on the plain MUGDiT (release layout), and their PEFT-style files.

    model = add_lora(MUGDiT(config), rank=64, alpha=32)   # the single-device LoRA model
    merge_lora(model)                                      # W += alpha/r * B A in place: a plain MUGDiT
    save_adapter("adapter/", tensors, rank=64, alpha=32, targets=[...])
    apply_adapter(model, "adapter/")                       # merge an adapter file into a plain MUGDiT

Targets are the names of mugv.models.megatron.weight_map.LORA_TARGETS (qkv, proj, cross_q,
cross_kv, cross_proj, fc1, fc2); the adapted module keeps its base weight and bias and gains
`lora_A` [r, in] and `lora_B` [out, r] (nn.Linear, no bias): y = W x + b + alpha/r * B A x.

Adapter directory (PEFT's LoRA format: peft.PeftModel.from_pretrained(MUGDiT(config), dir) loads it):
  adapter_model.safetensors  `base_model.model.blocks.{i}.<module>.lora_{A,B}.weight`, release layout
                             (qkv rows [all Q; all K; all V], kv rows [all K; all V]), e.g.
                             base_model.model.blocks.0.attn.qkv.lora_B.weight [3C, r]
  adapter_config.json        peft_type LORA, r, lora_alpha, lora_dropout, target_modules (release
                             module names, matched as name suffixes), bias "none", base_model_name_or_path
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from mugv.models.megatron.weight_map import LORA_TARGETS
from mugv.utils.checkpoint_io import write_json_atomic

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."


class LoRALinear(nn.Linear):
    """A base nn.Linear (its own weight and bias, shared) plus alpha/r * B A x."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        kw = dict(bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(base.in_features, rank, **kw)
        self.lora_B = nn.Linear(rank, base.out_features, **kw)
        nn.init.zeros_(self.lora_B.weight)
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.lora_B(self.lora_A(x)) * self.scale


def _target_modules(model: nn.Module, targets: Iterable[str]):
    """(target name, block index, parent module, attribute, module) of every adapted linear."""
    for name in targets:
        if name not in LORA_TARGETS:
            raise ValueError(f"unknown LoRA target {name!r}; known: {list(LORA_TARGETS)}")
        parent_path, attr = LORA_TARGETS[name][0].rsplit(".", 1)
        for i, block in enumerate(model.blocks):
            parent = block.get_submodule(parent_path)
            yield name, i, parent, attr, getattr(parent, attr)


def add_lora(model: nn.Module, rank: int, alpha: float, targets: Iterable[str] = tuple(LORA_TARGETS)) -> nn.Module:
    """Adapt the targeted linears of a MUGDiT in place (B = 0: the output is unchanged)."""
    for _, _, parent, attr, lin in list(_target_modules(model, targets)):
        if not isinstance(lin, LoRALinear):
            setattr(parent, attr, LoRALinear(lin, rank, alpha))
    return model


def merged_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """W + scale * B A, computed in fp32, in W's dtype."""
    return (weight.float() + scale * (b.float() @ a.float())).to(weight.dtype)


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, in place; the model is a plain MUGDiT again."""
    for name, lin in list(model.named_modules()):
        if isinstance(lin, LoRALinear):
            lin.weight.copy_(merged_weight(lin.weight, lin.lora_A.weight, lin.lora_B.weight, lin.scale))
            plain = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None, device="meta")
            plain.weight, plain.bias = lin.weight, lin.bias
            parent, attr = model.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1]
            setattr(parent, attr, plain)
    return model


# ---------------------------------------------------------------------------------------------
# adapter files
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterConfig:
    rank: int
    alpha: float
    targets: tuple[str, ...]
    dropout: float = 0.0
    base: str = ""  # where the frozen base weights came from (informational)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def adapter_keys(depth: int, targets: Iterable[str]) -> list[str]:
    """Release names of the adapter tensors: blocks.{i}.<module>.lora_{A,B}.weight."""
    return [f"blocks.{i}.{LORA_TARGETS[t][0]}.lora_{ab}.weight" for i in range(depth) for t in targets for ab in "AB"]


def save_adapter(directory: str, tensors: dict[str, torch.Tensor], config: AdapterConfig) -> None:
    """Write an adapter directory from release-named tensors (adapter_keys)."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    save_file({PEFT_PREFIX + k: v.detach().cpu().contiguous() for k, v in tensors.items()},
              os.path.join(directory, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    write_json_atomic(os.path.join(directory, ADAPTER_CONFIG), {
        "peft_type": "LORA",
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": [LORA_TARGETS[t][0] for t in config.targets],
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "base_model_name_or_path": config.base,
        "task_type": None,
    })


def load_adapter(directory: str) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """(config, release-named tensors) of an adapter directory; a clear error for anything else."""
    from safetensors.torch import load_file

    cfg_path, weights = os.path.join(directory, ADAPTER_CONFIG), os.path.join(directory, ADAPTER_WEIGHTS)
    for path in (cfg_path, weights):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{directory}: not a LoRA adapter directory (no {os.path.basename(path)})")
    with open(cfg_path) as f:
        raw = json.load(f)
    bad = {k: raw.get(k) for k in ("use_rslora", "use_dora", "fan_in_fan_out") if raw.get(k)}
    if raw.get("peft_type") != "LORA" or bad or raw.get("bias", "none") != "none":
        raise ValueError(f"{cfg_path}: only plain LoRA adapters are supported (peft_type LORA, bias none), got "
                         f"peft_type={raw.get('peft_type')!r} bias={raw.get('bias')!r} {bad}")
    by_module = {rel: name for name, (rel, _, _) in LORA_TARGETS.items()}
    modules = raw.get("target_modules") or []
    unknown = [m for m in modules if m not in by_module]
    if unknown:
        raise ValueError(f"{cfg_path}: target_modules {unknown} are not MUGDiT linears ({list(by_module)})")
    config = AdapterConfig(int(raw["r"]), float(raw["lora_alpha"]), tuple(by_module[m] for m in modules),
                           float(raw.get("lora_dropout", 0.0)), raw.get("base_model_name_or_path") or "")
    tensors = {}
    for k, v in load_file(weights).items():
        if not k.startswith(PEFT_PREFIX):
            raise ValueError(f"{weights}: key {k!r} does not start with {PEFT_PREFIX!r}")
        tensors[k[len(PEFT_PREFIX) :]] = v
    return config, tensors


@torch.no_grad()
def apply_adapter(model: nn.Module, directory: str) -> nn.Module:
    """Merge the adapter in `directory` into a plain MUGDiT's weights, in place (what
    `mugv sample --lora DIR` does); every adapted linear must be present, with matching shapes."""
    config, tensors = load_adapter(directory)
    expected = set(adapter_keys(len(model.blocks), config.targets))
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ValueError(f"{directory}: adapter tensors do not match the model ({len(model.blocks)} blocks, "
                         f"targets {list(config.targets)}): missing {missing[:3]}, unexpected {extra[:3]}")
    for name, i, _, _, lin in _target_modules(model, config.targets):
        rel = f"blocks.{i}.{LORA_TARGETS[name][0]}"
        a, b = tensors[f"{rel}.lora_A.weight"], tensors[f"{rel}.lora_B.weight"]
        if a.shape != (config.rank, lin.in_features) or b.shape != (lin.out_features, config.rank):
            raise ValueError(f"{directory}: {rel} adapter shapes A {list(a.shape)}, B {list(b.shape)} do not fit "
                             f"the linear {lin.out_features}x{lin.in_features} at rank {config.rank}")
        lin.weight.copy_(merged_weight(lin.weight, a.to(lin.weight.device), b.to(lin.weight.device), config.scale))
    return model

"""`mugv info`: versions, optional extras and model presets."""

from __future__ import annotations

import importlib.util


def register(sub) -> None:
    p = sub.add_parser("info", help="show versions, optional GPU extras and model presets")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    import mugv
    from mugv.models import PRESETS, MUGDiT, MUGDiTConfig

    print(f"mugv {mugv.__version__}  torch {torch.__version__}  cuda available: {torch.cuda.is_available()}")
    for mod in ["megatron.core", "transformer_engine", "flash_attn", "apex", "av", "decord", "transformers"]:
        found = importlib.util.find_spec(mod.split(".")[0]) is not None
        print(f"  {mod:20s} {'installed' if found else 'not installed'}")
    print("presets:")
    for name in PRESETS:
        with torch.device("meta"):
            n = sum(p.numel() for p in MUGDiT(MUGDiTConfig.from_preset(name)).parameters())
        print(f"  {name:12s} {n:>16,d} parameters")
    return 0

"""`mugv prep`: encode videos/images + captions into a mugv latent dataset.

    mugv prep --captions clips.csv --output data/ds --vae vae.pt|vae.json --t5 t5-xxl/ [--config prep.yaml] [key=value ...]
    mugv prep --pairs pairs.csv --output data/pairs ...     # preference pairs: caption,chosen,rejected

--vae takes what `mugv sample --vae` takes (mugv.sampling.load_autoencoder): a release vae.pt, or
a JSON spec naming its kind, weights and config (e.g. a small VideoVAEConfig for a CPU smoke run).
    torchrun --nproc-per-node 8 -m mugv.cli.main prep ...     # items split by RANK / WORLD_SIZE

Rerunning the same command resumes (finished and failed items are skipped).
"""

from __future__ import annotations

import os


def register(sub) -> None:
    p = sub.add_parser(
        "prep", help="encode media + captions into a latent dataset (resumable, torchrun-aware)"
    )
    p.add_argument("--config", default=None, help="YAML file of a PrepConfig")
    p.add_argument("--captions", default=None, help="CSV/JSONL with path and caption columns")
    p.add_argument("--pairs", default=None,
                   help="instead of --captions: CSV/JSONL of preference pairs (caption, chosen, rejected)")
    p.add_argument("--output", default=None, help="dataset directory")
    p.add_argument("--vae", default=None, help="autoencoder: a release vae.pt or a JSON spec, as `mugv sample --vae`")
    p.add_argument("--t5", default=None, help="local T5 encoder directory")
    p.add_argument("overrides", nargs="*", default=[], help="PrepConfig overrides key=value, e.g. fps=30")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from mugv.config import ConfigError, load_config
    from mugv.data.prep.pipeline import _DTYPES, PrepConfig, run_prep
    from mugv.sampling import load_autoencoder
    from mugv.text import T5TextEncoder

    flags = {k: getattr(args, k) for k in ("captions", "pairs", "output", "vae", "t5") if getattr(args, k)}
    cfg = load_config(PrepConfig, args.config, [*args.overrides, *(f"{k}={v}" for k, v in flags.items())])
    for key in ("vae", "t5"):
        if not getattr(cfg, key):
            raise ConfigError(f"{args.config or 'prep'}: {key} is empty (give --{key} or {key}=...)")
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(cfg.device or (f"cuda:{local}" if torch.cuda.is_available() else "cpu"))
    dtype = _DTYPES[cfg.encoder_dtype] if device.type == "cuda" else torch.float32
    vae = load_autoencoder(cfg.vae, device=device, dtype=dtype)  # as `mugv sample --vae`
    text = T5TextEncoder(cfg.t5, device=device, dtype=dtype)
    summary = run_prep(cfg, vae, text, device=device)
    print(summary.format())
    return 0

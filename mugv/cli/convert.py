"""`mugv convert`: Megatron checkpoints <-> HF directories / release dit.pt, and verification.

    mugv convert to-hf   --ckpt runs/x [--ema] --out hf_dir [--release dit.pt]
    mugv convert to-hf   --ckpt runs/lora_run --merge-lora --out hf_dir [--release dit.pt]   # base + adapters
    mugv convert to-hf   --ckpt runs/lora_run --lora-only --out adapter_dir      # PEFT-style adapter
    mugv convert from-hf --src dit.pt|hf_dir --out ckpt_dir [--config mugdit_10b|config.json]
    mugv convert verify  --hf dit.pt|hf_dir --ckpt ckpt_dir [--tp 2 --pp 2 --cp 2] [--ema] [--tolerance 1e-4]

--ckpt takes a checkpoint directory, a run directory (its checkpoints/latest) or a checkpoints/
folder (its latest). from-hf writes model.* and ema.* (the same weights) in the layout-independent
key space: the result loads at any TP/PP. verify exits 1 when the relative difference is above
the tolerance.
"""

from __future__ import annotations

GiB = 2**30


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert between Megatron checkpoints and HF / release weights")
    conv = p.add_subparsers(dest="convert_command", metavar="<to-hf|from-hf|verify>")
    conv.required = True

    t = conv.add_parser("to-hf", help="Megatron checkpoint -> HF directory and/or release dit.pt")
    t.add_argument("--ckpt", required=True, help="checkpoint dir, run dir or checkpoints/ dir")
    t.add_argument("--out", default=None, help="HF output directory (config.json + safetensors)")
    t.add_argument("--release", default=None, help="also/instead write a release dit.pt here")
    t.add_argument("--ema", action="store_true", help="export the EMA weights instead of the raw weights")
    t.add_argument("--shard-gb", type=float, default=5.0, help="max safetensors shard size (GiB)")
    lora = t.add_mutually_exclusive_group()
    lora.add_argument("--merge-lora", action="store_true",
                      help="LoRA checkpoint: write its base with the adapters merged (loads into the plain MUGDiT)")
    lora.add_argument("--lora-only", action="store_true",
                      help="LoRA checkpoint: write only the adapter to --out (adapter_model.safetensors + adapter_config.json)")
    t.set_defaults(func=run_to_hf)

    f = conv.add_parser("from-hf", help="HF directory or release dit.pt -> Megatron checkpoint (any TP/PP)")
    f.add_argument("--src", required=True, help="HF directory or release dit.pt")
    f.add_argument("--out", required=True, help="Megatron checkpoint directory to create")
    f.add_argument(
        "--config", default=None, help="preset name or JSON (dit.pt only; inferred from shapes if absent)"
    )
    f.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    f.set_defaults(func=run_from_hf)

    v = conv.add_parser(
        "verify", help="compare a Megatron checkpoint with HF / release weights on a probe batch"
    )
    v.add_argument("--hf", required=True, help="HF directory or release dit.pt")
    v.add_argument("--ckpt", required=True, help="checkpoint dir, run dir or checkpoints/ dir")
    v.add_argument("--tp", type=int, default=1, help="tensor-parallel size to load at")
    v.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to load at")
    v.add_argument("--cp", type=int, default=1, help="context-parallel size to run the probe at")
    v.add_argument("--cp-attention", choices=("a2a", "allgather"), default="a2a", help="context-parallel attention")
    v.add_argument("--ema", action="store_true", help="check the EMA weights of the checkpoint")
    v.add_argument("--tolerance", type=float, default=1e-4, help="max allowed |diff| / max |reference|")
    v.add_argument("--seed", type=int, default=0, help="probe batch seed")
    v.set_defaults(func=run_verify)


def run_to_hf(args) -> int:
    from mugv.convert import to_hf

    if args.out is None and args.release is None:
        raise SystemExit("mugv convert to-hf: give --out and/or --release")
    ckpt = to_hf(args.ckpt, args.out, args.release, ema=args.ema, max_shard_bytes=int(args.shard_gb * GiB),
                 merge_lora=args.merge_lora, lora_only=args.lora_only)
    print(f"converted {ckpt} -> {', '.join(p for p in (args.out, args.release) if p)}")
    return 0


def run_from_hf(args) -> int:
    from mugv.convert import from_hf, parse_config_arg

    config = parse_config_arg(args.config) if args.config else None
    config = from_hf(args.src, args.out, config, overwrite=args.overwrite)
    print(f"converted {args.src} -> {args.out} (hidden {config.hidden_size}, depth {config.depth})")
    return 0


def run_verify(args) -> int:
    from mugv.convert import verify

    result = verify(
        args.hf, args.ckpt, tp=args.tp, pp=args.pp, cp=args.cp, cp_attention=args.cp_attention,
        ema=args.ema, tolerance=args.tolerance, seed=args.seed,
    )  # fmt: skip
    print(result.format())
    return 0 if result.ok else 1

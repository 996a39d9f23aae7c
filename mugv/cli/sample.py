"""`mugv sample`: generate a video from a prompt (and optionally a first-frame image).

    mugv sample --model hf_dir|ckpt_dir|run_dir|dit.pt --t5 t5-xxl/ --vae vae.pt \\
        --prompt "a cat surfing" [--negative-prompt "..."] [--image ref.png] \\
        --frames 105 --height 720 --width 1280 --steps 25 --guidance 4 --seed 0 --out out.mp4

--vae accepts any autoencoder path understood by mugv.sampling.load_autoencoder (a vae.pt, or a
JSON spec / a JSON next to the weights naming its "kind"). With a Megatron checkpoint, --ema
samples from its EMA weights.
"""

from __future__ import annotations

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def register(sub) -> None:
    p = sub.add_parser("sample", help="generate a video (text-to-video, or image-to-video with --image)")
    p.add_argument(
        "--model", required=True, help="HF directory, Megatron checkpoint / run directory, or dit.pt"
    )
    p.add_argument(
        "--config", default=None, help="preset or JSON for a dit.pt (default: inferred from shapes)"
    )
    p.add_argument("--ema", action="store_true", help="use the EMA weights of a Megatron checkpoint")
    p.add_argument("--t5", required=True, help="local T5 encoder directory")
    p.add_argument("--text-length", type=int, default=300, help="T5 tokens (padded / truncated)")
    p.add_argument("--vae", required=True, help="autoencoder: vae.pt or a JSON spec (see mugv.sampling)")
    p.add_argument("--prompt", required=True)
    p.add_argument(
        "--prompt-suffix", default="", help='appended to the prompt, e.g. " aesthetic score: 6.0."'
    )
    p.add_argument("--negative-prompt", default="", help="text of the unconditional CFG branch")
    p.add_argument("--image", default=None, help="first-frame reference image (image-to-video)")
    p.add_argument("--frames", type=int, default=105, help="pixel frames, 8k+1 for the video VAE")
    p.add_argument("--height", type=int, default=720)
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--shift-ratio", type=float, default=0.0,
                   help="timestep shift ratio; 0 = from the output size (SPEC); use the training run's train.shift_ratio")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fps", type=float, default=30.0, help="fps conditioning and of the written mp4")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on GPU, float32 on CPU"
    )
    p.add_argument("--out", required=True, help="output .mp4")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from mugv.convert import parse_config_arg
    from mugv.sampling import generate, load_autoencoder, load_model
    from mugv.text import T5TextEncoder
    from mugv.utils.logging import get_logger
    from mugv.utils.video import to_uint8_frames, write_video

    log = get_logger(__name__)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    )
    config = parse_config_arg(args.config) if args.config else None
    model = load_model(args.model, config, ema=args.ema, device=device, dtype=dtype)
    text = T5TextEncoder(args.t5, max_length=args.text_length, device=device, dtype=dtype)
    vae = load_autoencoder(args.vae, device=device, dtype=dtype)
    video = generate(
        model, text, vae, [args.prompt + args.prompt_suffix], negative_prompt=args.negative_prompt,
        num_frames=args.frames, height=args.height, width=args.width, steps=args.steps,
        guidance=args.guidance, seed=args.seed, image=args.image, fps=args.fps, shift_ratio=args.shift_ratio,
        progress=lambda i, n: log.info("step %d/%d", i, n),
    )  # fmt: skip
    write_video(args.out, to_uint8_frames(video[0]), fps=args.fps)
    print(f"wrote {args.out}: {video.shape[2]} frames {video.shape[3]}x{video.shape[4]}")
    return 0

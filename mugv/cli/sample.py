"""`mugv sample`: generate a video from a prompt (and optionally a first-frame image).

    mugv sample --model hf_dir|ckpt_dir|run_dir|dit.pt --t5 t5-xxl/ --vae vae.pt \\
        --prompt "a cat surfing" [--image ref.png] \\
        --frames 105 --height 720 --width 1280 --steps 25 --guidance 4 --seed 0 --out out.mp4

The defaults reproduce the release pipeline (its negative prompt, the " aesthetic score: 6.0."
suffix, the bf16-rounded shift ratio in a bf16 run, Pillow bicubic resize, the reference image as
frame 0); --negative-prompt "", --prompt-suffix "", --exact-shift-ratio, --image-resample bilinear
and --decoded-first-frame switch each off. bf16 on GPU, fp32 on CPU unless --dtype says otherwise.
The phases run one model at a time (T5, then the DiT, then the decode), each freed before the
next is loaded; `--dry-run` prints the estimated peak memory of each phase and loads no weights.

--vae accepts an autoencoder path understood by mugv.sampling.load_autoencoder (a vae.pt, or a
JSON spec / a JSON next to the weights naming a registered "kind": "video_vae" or the CPU
stand-in "pca"). With a Megatron checkpoint, --ema samples from its EMA weights (a LoRA training
checkpoint samples its base with the adapters merged). --lora DIR merges a LoRA adapter directory
(`mugv convert to-hf --lora-only`, PEFT-style) into the model's weights before sampling.
--out *.pt writes the fp32 video tensor [3, F, H, W] in [-1, 1] instead of an mp4.
"""

from __future__ import annotations

import gc
import sys

from mugv.diffusion import RELEASE_NEGATIVE_PROMPT, RELEASE_PROMPT_SUFFIX

DTYPES = ("bfloat16", "float16", "float32")


def register(sub) -> None:
    p = sub.add_parser("sample", help="generate a video (text-to-video, or image-to-video with --image)")
    p.add_argument("--model", default=None, help="HF directory, Megatron checkpoint / run directory, or dit.pt")
    p.add_argument(
        "--config", default=None, help="preset or JSON for a dit.pt (default: inferred from shapes)"
    )
    p.add_argument("--ema", action="store_true", help="use the EMA weights of a Megatron checkpoint")
    p.add_argument("--lora", default=None, help="LoRA adapter directory to merge into the model (to-hf --lora-only)")
    p.add_argument("--t5", required=True, help="local T5 encoder directory")
    p.add_argument("--text-length", type=int, default=300, help="T5 tokens (padded / truncated)")
    p.add_argument("--vae", required=True, help="autoencoder: vae.pt or a JSON spec (see mugv.sampling)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--prompt-suffix", default=RELEASE_PROMPT_SUFFIX,
                   help='appended to the prompt (default: the release\'s " aesthetic score: 6.0."; "" = none)')
    p.add_argument("--negative-prompt", default=RELEASE_NEGATIVE_PROMPT,
                   help="text of the unconditional CFG branch (default: the release's negative prompt)")
    p.add_argument("--image", default=None, help="first-frame reference image (image-to-video)")
    p.add_argument("--image-resample", choices=("bicubic", "bilinear"), default="bicubic",
                   help="reference image resize (Pillow; the release: bicubic)")
    p.add_argument("--decoded-first-frame", action="store_true",
                   help="I2V: keep the decoded latent frame 0 instead of the reference image's pixels")
    p.add_argument("--frames", type=int, default=105, help="pixel frames, 8k+1 for the video VAE")
    p.add_argument("--height", type=int, default=720)
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--shift-ratio", type=float, default=0.0,
                   help="timestep shift ratio; 0 = from the output size (SPEC); use the training run's train.shift_ratio")
    p.add_argument("--exact-shift-ratio", action="store_true",
                   help="compute the size-based shift ratio in float64 (the release rounds it to the model dtype)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fps", type=float, default=30.0, help="fps conditioning and of the written mp4")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--dry-run", action="store_true", help="print the peak-memory estimate; load no weights")
    p.add_argument("--out", default=None, help="output .mp4 (or .pt: the fp32 video tensor)")
    p.set_defaults(func=run)


def _free(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _progress_bar(steps: int):
    from tqdm import tqdm

    bar = tqdm(total=steps, desc="sampling", unit="step", disable=not sys.stderr.isatty())
    return bar, lambda i, n: bar.update(i - bar.n)


def run(args) -> int:
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if args.model is None and not (args.dry_run and args.config):
        print("mugv sample: --model is required (a --dry-run may give --config instead)", file=sys.stderr)
        return 2
    if args.dry_run:
        from mugv.sample_memory import estimate_sample_memory

        print(estimate_sample_memory(args, dtype).table())
        return 0
    if not args.out:
        print("mugv sample: --out is required", file=sys.stderr)
        return 2
    from mugv.convert import parse_config_arg
    from mugv.sampling import (
        decode_latents,
        encode_prompts,
        encode_reference,
        latent_size,
        load_autoencoder,
        load_model,
        sample_latents,
    )  # fmt: skip
    from mugv.text import T5TextEncoder
    from mugv.utils.video import to_uint8_frames, write_video

    negative = args.negative_prompt if args.guidance != 1.0 else None
    text = T5TextEncoder(args.t5, max_length=args.text_length, device=device, dtype=dtype)
    cond = encode_prompts(text, [args.prompt], negative, args.prompt_suffix)
    del text
    _free(device)
    vae = load_autoencoder(args.vae, device=device, dtype=dtype)
    latent_shape = latent_size(vae, args.frames, args.height, args.width)
    pixels = ref = None
    if args.image:
        pixels, ref = encode_reference(vae, args.image, args.height, args.width, args.image_resample)
    config = parse_config_arg(args.config) if args.config else None
    model = load_model(args.model, config, ema=args.ema, device=device, dtype=dtype, lora=args.lora)
    bar, progress = _progress_bar(args.steps)
    latents = sample_latents(
        model, cond, [args.prompt], latent_shape, steps=args.steps, guidance=args.guidance, seed=args.seed,
        cond_latent=ref, fps=args.fps, progress=progress, shift_ratio=args.shift_ratio,
        ratio_in_model_dtype=not args.exact_shift_ratio,
    )  # fmt: skip
    bar.close()
    del model
    _free(device)
    video = decode_latents(vae, latents, None if args.decoded_first_frame else pixels)
    if args.out.endswith(".pt"):
        torch.save(video[0], args.out)
    else:
        write_video(args.out, to_uint8_frames(video[0]), fps=args.fps)
    print(f"wrote {args.out}: {video.shape[2]} frames {video.shape[3]}x{video.shape[4]}")
    return 0

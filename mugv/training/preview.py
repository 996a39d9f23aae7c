"""Preview samples during training: every `preview.interval` steps, right after the checkpoint
of that step, rank 0 loads the checkpoint's EMA weights (raw weights without EMA) into a plain
MUGDiT, samples the configured prompts (Euler + CFG), and writes the clips to
<run_dir>/previews/step_XXXXXXXX_<i>.mp4 (or the latents as .pt when no autoencoder is set)
and to TensorBoard / wandb. The other ranks wait at a barrier."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from mugv.training.config import PreviewConfig
from mugv.utils.logging import get_logger

log = get_logger("preview")


class Previewer:
    def __init__(self, cfg: PreviewConfig, run_dir: str, use_ema: bool, shift_ratio: float = 0.0):
        self.cfg, self.use_ema, self.shift_ratio = cfg, use_ema, shift_ratio
        self.out_dir = os.path.join(run_dir, "previews")
        self.enabled = cfg.interval > 0 and bool(cfg.prompts)
        if cfg.interval > 0 and not cfg.prompts:
            log.warning("preview.interval is set but preview.prompts is empty: no previews")
        if self.enabled and not cfg.text_encoder:
            raise ValueError("preview.text_encoder (a local T5 directory) is needed for preview prompts")

    def due(self, step: int) -> bool:
        return self.enabled and step % self.cfg.interval == 0

    def maybe_preview(self, step: int, checkpoint: str, metrics) -> None:
        if not self.due(step):
            return
        rank = dist.get_rank() if dist.is_initialized() else 0
        if rank == 0:
            self._sample(step, checkpoint, metrics)
        if dist.is_initialized():
            dist.barrier()

    @torch.no_grad()
    def _sample(self, step: int, checkpoint: str, metrics) -> None:
        from mugv.sampling import generate, load_autoencoder, load_model, sample_latents
        from mugv.text import T5TextEncoder
        from mugv.utils.video import to_uint8_frames, write_video

        c = self.cfg
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = load_model(checkpoint, ema=self.use_ema, device=device)
        text = T5TextEncoder(c.text_encoder, device=device)
        os.makedirs(self.out_dir, exist_ok=True)
        T, h, w = c.latent_shape
        common = dict(negative_prompt="", steps=c.sampler.num_steps, guidance=c.sampler.guidance_scale,
                      seed=step, fps=c.sampler.fps, latent_shape=(T, h, w),
                      shift_ratio=c.sampler.shift_ratio or self.shift_ratio)
        base = os.path.join(self.out_dir, f"step_{step:08d}")
        if not c.autoencoder:
            latents = sample_latents(model, text, c.prompts, **common)
            torch.save(latents.cpu(), base + "_latents.pt")
            log.info(f"preview latents at step {step}: {base}_latents.pt")
            return
        ae = load_autoencoder(c.autoencoder, device=device)
        videos = generate(model, text, ae, c.prompts, **common)  # [B, 3, F, H, W] in [-1, 1]
        for i, v in enumerate(videos):
            frames = to_uint8_frames(v)  # [F, H, W, 3]
            write_video(f"{base}_{i}.mp4", frames, fps=int(c.sampler.fps))
            metrics.log_video(step, f"preview/{i}", frames)
        log.info(f"preview videos at step {step}: {base}_*.mp4")

"""Preview samples during training, on the live sharded model.

At start-up rank 0 encodes the preview prompts once (then frees the text encoder) and sends
the small encodings to every rank. Every `preview.interval` steps each rank swaps the EMA into
its fp32 main parameters (in place; the weights follow, all-gathered over DP as after an
optimizer step), samples the prompts forward-only through the training model at its own
layout (TP/PP/CP, in the training dtype, under no_grad; every rank draws the same noise and
takes the same Euler steps), then swaps back: the weights are restored bit for bit and training
goes on. No checkpoint is written for a preview and no rank holds a second copy of the model;
rank 0 alone decodes the latents (chunked) and writes <run_dir>/previews/step_XXXXXXXX_<i>.mp4
(or the latents as .pt when no autoencoder is set) and to TensorBoard / wandb.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from mugv.checkpoint.checkpointer import weights_from_main_params
from mugv.models.megatron import padded_sequence_length
from mugv.training.config import PreviewConfig
from mugv.utils.logging import get_logger

log = get_logger("preview")
_NAMES = ("x", "timestep", "y", "mask", "x_mask", "fps", "frame_indices")


class LiveVelocity:
    """The training model's chunks as a sampler velocity model (mugv.diffusion.euler_sample):
    returns the full prediction [B, Cout, T, H, W] (fp32) on every rank."""

    def __init__(self, model: list, mcfg, device: torch.device):
        self.model, self.mcfg, self.device = model, mcfg, device
        self.dtype = torch.bfloat16 if mcfg.bf16 else torch.float32

    def __call__(self, *args) -> torch.Tensor:
        inputs = dict(zip(_NAMES, args))
        if len(self.model) == 1 and parallel_state.get_pipeline_model_parallel_world_size() == 1:
            return self.model[0](**inputs).float()
        B, _, T, H, W = inputs["x"].shape
        one = len(self.model) == 1
        results = get_forward_backward_func()(
            forward_step_func=_forward_step,
            data_iterator=iter([inputs]) if one else [iter([inputs]) for _ in self.model],
            model=self.model[0] if one else self.model,
            num_microbatches=1,
            seq_length=padded_sequence_length(self.mcfg, T, H, W),
            micro_batch_size=B,
            forward_only=True,
        )
        out = results[0]["v"] if results else torch.empty(B, self.mcfg.dit.out_channels, T, H, W, device=self.device)
        group = parallel_state.get_pipeline_model_parallel_group()
        dist.broadcast(out, src=parallel_state.get_pipeline_model_parallel_last_rank(), group=group)
        return out


def _forward_step(data_iterator, model):
    out = model(**next(data_iterator))
    return out, lambda o: (o.new_zeros(()), {"v": o.float()})


class Previewer:
    def __init__(self, cfg: PreviewConfig, run_dir: str, shift_ratio: float = 0.0):
        self.cfg, self.shift_ratio = cfg, shift_ratio
        self.out_dir = os.path.join(run_dir, "previews")
        self.enabled = cfg.interval > 0 and bool(cfg.prompts)
        self.text = None  # the prompts' encodings (mugv.sampling.TextConditioning), on every rank
        if cfg.interval > 0 and not cfg.prompts:
            log.warning("preview.interval is set but preview.prompts is empty: no previews")
        if self.enabled and not cfg.text_encoder:
            raise ValueError("preview.text_encoder (a local T5 directory) is needed for preview prompts")

    def due(self, step: int) -> bool:
        return self.enabled and step % self.cfg.interval == 0

    @torch.no_grad()
    def setup(self, device: torch.device) -> None:
        """Encode the prompts once on rank 0 and share them (collective); the encoder is freed."""
        if not self.enabled:
            return
        from mugv.sampling import encode_prompts
        from mugv.text import T5TextEncoder

        s = self.cfg.sampler
        box = [None]
        if _rank() == 0:
            encoder = T5TextEncoder(self.cfg.text_encoder, device=device)
            negative = s.negative_prompt if s.guidance_scale != 1.0 else None
            box[0] = encode_prompts(encoder, self.cfg.prompts, negative, s.prompt_suffix).to("cpu")
            del encoder
        if dist.is_initialized():
            dist.broadcast_object_list(box, src=0)
        self.text = box[0]

    def maybe_preview(self, step: int, model: list, mcfg, optimizer, ema, metrics, device) -> None:
        if not self.due(step):
            return
        latents = self.sample(step, model, mcfg, optimizer, ema, device)
        if _rank() == 0:
            self._write(step, latents, metrics, device)
        if dist.is_initialized():
            dist.barrier()

    @torch.no_grad()
    def sample(self, step: int, model: list, mcfg, optimizer, ema, device) -> torch.Tensor:
        """Latents [B, C, T, h, w] (fp32) of the prompts with the EMA weights (raw weights
        without EMA); collective over every rank."""
        from mugv.sampling import sample_latents

        s = self.cfg.sampler
        for m in model:
            m.eval()
        if ema is not None:
            ema.swap_into_main_params()
            weights_from_main_params(model, optimizer)
        try:
            return sample_latents(
                LiveVelocity(model, mcfg, device), self.text, self.cfg.prompts, tuple(self.cfg.latent_shape),
                steps=s.num_steps, guidance=s.guidance_scale, seed=step, fps=s.fps,
                latent_channels=mcfg.dit.in_channels, shift_ratio=s.shift_ratio or self.shift_ratio,
                ratio_in_model_dtype=s.ratio_in_model_dtype,
            )  # fmt: skip
        finally:
            if ema is not None:
                ema.swap_into_main_params()
                weights_from_main_params(model, optimizer)
            for m in model:
                m.train()

    def _write(self, step: int, latents: torch.Tensor, metrics, device) -> None:
        from mugv.sampling import decode_latents, load_autoencoder
        from mugv.utils.video import to_uint8_frames, write_video

        os.makedirs(self.out_dir, exist_ok=True)
        base = os.path.join(self.out_dir, f"step_{step:08d}")
        if not self.cfg.autoencoder:
            torch.save(latents.cpu(), base + "_latents.pt")
            log.info(f"preview latents at step {step}: {base}_latents.pt")
            return
        ae = load_autoencoder(self.cfg.autoencoder, device=device)
        videos = decode_latents(ae, latents)  # [B, 3, F, H, W] in [-1, 1], CPU
        del ae
        for i, v in enumerate(videos):
            frames = to_uint8_frames(v)  # [F, H, W, 3]
            write_video(f"{base}_{i}.mp4", frames, fps=int(self.cfg.sampler.fps))
            metrics.log_video(step, f"preview/{i}", frames)
        log.info(f"preview videos at step {step}: {base}_*.mp4")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0

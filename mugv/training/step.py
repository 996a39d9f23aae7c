"""The DiT forward step: the only place the training loop meets the model.

For one micro-batch: sample timesteps (logit-normal, shifted by each sample's own pixel size
and latent frame count), noise, interpolate, drop text per sample for classifier-free
guidance, predict, and return the masked flow-matching loss of every sample; the step's loss is
their mean over all samples of the step (`sample_mean_loss`). All randomness comes from a
generator seeded by (run seed, micro-batch stream index), so every tensor/context/pipeline
rank that sees the micro-batch draws the same noise, different data-parallel ranks draw
different noise, and a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import torch

from mugv.data.batch import LatentBatch, PackedBatch
from mugv.diffusion import add_noise, flow_loss, sample_timesteps, shift_ratio, velocity_target


def per_sample_loss(output, target, x_mask) -> torch.Tensor:
    """[K] masked flow loss of each sample of a micro-batch: a batch (tensors), or a packed one
    (lists over its groups of same-shape samples, as the model takes and returns them)."""
    if isinstance(output, (list, tuple)):
        return torch.cat([flow_loss(o, t, m) for o, t, m in zip(output, target, x_mask, strict=True)])
    return flow_loss(output, target, x_mask)


def sample_mean_loss(per_sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the per-sample losses, their count): what a loss function returns under Megatron's
    calculate_per_token_loss (set by mugv.models.megatron.megatron_config), with samples as the
    "tokens". The schedule sums it over micro-batches and DP, mugv.parallel.grads divides the
    gradients by the step's sample count: the step's loss is the mean over all its samples, each
    sample's masked flow loss counting the same whatever micro-batch or rank it landed in."""
    count = torch.tensor(per_sample.numel(), dtype=torch.int, device=per_sample.device)
    return per_sample.sum(), count


def microbatch_generator(seed: int, stream_index: int, device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + stream_index) % (2**63))
    return g


class DiTForwardStep:
    """Megatron forward_step_func: (data_iterator, model) -> (output, loss_func)."""

    def __init__(self, seed: int, text_dropout: float, null_text: tuple[torch.Tensor, torch.Tensor] | None,
                 shift_ratio: float = 0.0):
        if text_dropout > 0 and null_text is None:
            raise ValueError("train.text_dropout > 0 needs the dataset's null text embedding (text_null)")
        self.seed, self.text_dropout, self.null_text = seed, text_dropout, null_text
        self.shift_ratio = shift_ratio  # 0: from each sample's pixel size and latent frame count

    def noised_inputs(self, batch: LatentBatch | PackedBatch) -> tuple[dict, torch.Tensor | list]:
        """Model inputs and the velocity target of one micro-batch. A packed micro-batch of several
        buckets gives the model's packed form: every input and the target a list over its parts,
        each sample with its own timestep, noise and text dropout."""
        parts = batch.parts
        g = microbatch_generator(self.seed, batch.stream_index, parts[0].latents.device)
        made = [self._noised_part(p, g) for p in parts]
        if len(made) == 1:
            return made[0]
        return {k: [inputs[k] for inputs, _ in made] for k in made[0][0]}, [target for _, target in made]

    def _noised_part(self, batch: LatentBatch, g: torch.Generator) -> tuple[dict, torch.Tensor]:
        x0 = batch.latents
        dev = x0.device
        H_px, W_px = batch.pixel_size[:, 0], batch.pixel_size[:, 1]
        ratio = shift_ratio(H_px.cpu(), W_px.cpu(), x0.shape[2])
        if self.shift_ratio > 0:
            ratio = torch.full_like(ratio, self.shift_ratio)
        t = sample_timesteps(ratio.to(dev), g)
        eps = torch.randn(x0.shape, generator=g, device=dev, dtype=x0.dtype)
        y, mask = batch.y, batch.mask
        if self.text_dropout > 0:
            drop = torch.rand(x0.shape[0], generator=g, device=dev) < self.text_dropout
            if bool(drop.any()):
                y, mask = self._drop_text(y, mask, drop)
        inputs = dict(
            x=add_noise(x0, eps, t, batch.x_mask), timestep=t, y=y, mask=mask,
            x_mask=batch.x_mask, fps=batch.fps, frame_indices=batch.frame_indices,
        )
        return inputs, velocity_target(x0, eps)

    def _drop_text(self, y, mask, drop):
        null_y, null_mask = self.null_text  # [Ln, Ct], [Ln]
        L = y.shape[2]
        ny = torch.zeros(L, y.shape[-1], dtype=y.dtype, device=y.device)
        nm = torch.zeros(L, dtype=torch.bool, device=y.device)
        n = min(L, null_y.shape[0])
        ny[:n], nm[:n] = null_y[:n].to(y), null_mask[:n].to(y.device)
        y = torch.where(drop.view(-1, 1, 1, 1), ny.view(1, 1, L, -1), y)
        mask = torch.where(drop.view(-1, 1), nm.view(1, L), mask)
        return y, mask

    def __call__(self, data_iterator, model):
        batch: LatentBatch | PackedBatch = next(data_iterator)
        inputs, target = self.noised_inputs(batch)
        output = model(**inputs)

        def loss_func(out):
            per_sample = per_sample_loss(out, target, inputs["x_mask"])  # [K]
            return *sample_mean_loss(per_sample), {
                "loss": per_sample.detach().mean(),
                "per_sample": per_sample.detach(),
                "tasks": batch.tasks,
                "ids": batch.ids,
            }

        return output, loss_func

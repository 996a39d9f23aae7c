"""Training objectives: what the forward step does around the model call.

An objective draws the timesteps and noise of a micro-batch, builds the model inputs and the
target, and turns the model output (and, if it needs one, the reference model's output) into
the loss and its metrics:

    inputs, target = objective.noised_inputs(batch)     # model kwargs, velocity target [B, C, T, H, W]
    result = objective.loss(output, target, inputs["x_mask"], ref_output)   # ObjectiveLoss

`train.objective` picks one (`make_objective`):

    flow      rectified flow (SPEC section 4): the pre-training and SFT objective
    flow_dpo  Flow-DPO on preference pairs (mugv.training.dpo); needs a pairs dataset
              (`mugv prep --pairs`) and a reference model (mugv.training.reference)

All randomness comes from a generator seeded by (run seed, micro-batch stream index), so every
tensor/context/pipeline rank that sees the micro-batch draws the same noise, different
data-parallel ranks draw different noise, and a resumed run draws exactly what an uninterrupted
one would. Draws are made per *unit*: a sample for `flow`, a (chosen, rejected) pair for
`flow_dpo`, whose two clips get the same timestep, noise and text dropout. A packed micro-batch
(data.packing; `flow` only) is drawn part after part.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mugv.data.batch import LatentBatch, PackedBatch
from mugv.diffusion import add_noise, flow_loss, sample_timesteps, shift_ratio, velocity_target

OBJECTIVES = ("flow", "flow_dpo")


def per_sample_loss(output, target, x_mask) -> torch.Tensor:
    """[K] masked flow loss of each sample of a micro-batch: a batch (tensors), or a packed one
    (lists over its groups of same-shape samples, as the model takes and returns them)."""
    if isinstance(output, (list, tuple)):
        return torch.cat([flow_loss(o, t, m) for o, t, m in zip(output, target, x_mask, strict=True)])
    return flow_loss(output, target, x_mask)


def microbatch_generator(seed: int, stream_index: int, device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + stream_index) % (2**63))
    return g


@dataclass
class ObjectiveLoss:
    """One micro-batch's loss. `terms` [U] are the per-unit losses (samples for flow, pairs for
    DPO) whose mean is the micro-batch loss; `per_sample` [B] (detached) is what the metrics
    record per sample; `values` are per-unit metric values (detached, [U] each) logged as means."""

    terms: torch.Tensor
    per_sample: torch.Tensor
    values: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def loss(self) -> torch.Tensor:
        return self.terms.mean()


class FlowObjective:
    """Rectified flow: logit-normal timesteps shifted by each sample's own pixel size and latent
    frame count (or a fixed ratio), x_t = (1 - s) x0 + s eps, target v = x0 - eps, text dropped
    per sample for classifier-free guidance, loss = the masked per-sample flow error."""

    name = "flow"
    group = 1  # samples per unit (a pair is 2)
    needs_reference = False
    metric_keys: tuple[str, ...] = ()
    flops_factor = 1.0  # model FLOPs of a step relative to forward + backward of its samples

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
        """One bucket's samples; the draws are made per unit (`group` samples)."""
        x0 = batch.latents  # [B, C, T, H, W], B = units * group
        dev, k = x0.device, self.group
        units = x0.shape[0] // k
        if units * k != x0.shape[0]:
            raise ValueError(f"{self.name}: a micro-batch of {x0.shape[0]} samples is not whole units of {k}")
        per_sample = (lambda v: v) if k == 1 else (lambda v: v.repeat_interleave(k, dim=0))
        H_px, W_px = batch.pixel_size[::k, 0], batch.pixel_size[::k, 1]  # one per unit
        ratio = shift_ratio(H_px.cpu(), W_px.cpu(), x0.shape[2])
        if self.shift_ratio > 0:
            ratio = torch.full_like(ratio, self.shift_ratio)
        t = per_sample(sample_timesteps(ratio.to(dev), g))  # [B]
        eps = per_sample(torch.randn((units, *x0.shape[1:]), generator=g, device=dev, dtype=x0.dtype))
        y, mask = batch.y, batch.mask
        if self.text_dropout > 0:
            drop = per_sample(torch.rand(units, generator=g, device=dev) < self.text_dropout)  # [B]
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

    def loss(self, output, target, x_mask, reference=None) -> ObjectiveLoss:
        """output, target, x_mask: tensors, or lists over a packed micro-batch's parts."""
        per_sample = per_sample_loss(output, target, x_mask)  # [B]
        return ObjectiveLoss(per_sample, per_sample.detach())


def make_objective(train, dpo, null_text: tuple[torch.Tensor, torch.Tensor] | None):
    """The objective `train.objective` names (train: TrainSection, dpo: DPOConfig)."""
    if train.objective == "flow":
        return FlowObjective(train.seed, train.text_dropout, null_text, train.shift_ratio)
    if train.objective == "flow_dpo":
        from mugv.training.dpo import FlowDPOObjective

        return FlowDPOObjective(train.seed, train.text_dropout, null_text, train.shift_ratio, beta=dpo.beta)
    raise ValueError(f"train.objective must be one of {OBJECTIVES}, got {train.objective!r}")

"""Flow-DPO: direct preference optimisation of a rectified-flow model on (chosen, rejected) pairs.

Diffusion-DPO (Wallace et al. 2023, "Diffusion Model Alignment Using Direct Preference
Optimization", arXiv 2311.12908, eq. 14) turns DPO's likelihood ratios into denoising errors:

    L = -E log sigmoid( -beta T w(lambda_t) [ (|eps^w - eps_theta(x^w_t)|^2 - |eps^w - eps_ref(x^w_t)|^2)
                                            - (|eps^l - eps_theta(x^l_t)|^2 - |eps^l - eps_ref(x^l_t)|^2) ] )

with the same t for both images of a pair; its reference implementation takes each error as a
mean over elements and uses -beta/2 (the 2 and T w(lambda_t) absorbed into beta). Flow-DPO (Liu
et al. 2025, "Improving Video Generation with Human Feedback", arXiv 2501.13918) carries this to
rectified flow: with x_t = (1 - s) x0 + s eps and v = x0 - eps, eps_hat - eps = -(1 - s)(v_hat - v),
so the errors become velocity errors with beta_t = beta (1 - s)^2; the paper writes the loss with
beta_t / 2 and trains with a constant beta, which is what this module does:

    d(x)  = |v_theta(x_t) - v*|^2 - |v_ref(x_t) - v*|^2       masked flow error (flow_loss), per sample
    z     = -beta/2 * (d(chosen) - d(rejected))                the implicit reward margin
    loss  = -log sigmoid(z)                                    per pair; the micro-batch loss is its mean

Sign: lowering the policy's error on the chosen clip relative to the reference (d(chosen) < 0)
raises z and lowers the loss. Scale: flow_loss is a mean over channels, pixels and denoised
frames, so beta is in those units (one value for every bucket size); `dpo.beta` sets it.

A pair is two consecutive samples of a paired micro-batch (2k chosen, 2k + 1 rejected; see
mugv.data.pairs); both get the same timestep, noise and text dropout (FlowObjective draws per
pair). Logged per pair: the reward accuracy (share of pairs with z > 0; a tie, as at the start
where the policy is the reference, counts one half), the reward margin z, and the policy's flow
losses on the chosen and rejected clips.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mugv.data.batch import LatentBatch
from mugv.diffusion import flow_loss
from mugv.training.objective import FlowObjective, ObjectiveLoss

METRICS = ("dpo/reward_accuracy", "dpo/reward_margin", "dpo/flow_loss_chosen", "dpo/flow_loss_rejected")


def reward_accuracy(z: torch.Tensor) -> torch.Tensor:
    """Per pair: 1 if the implicit reward prefers the chosen clip (z > 0), 0 if the rejected one,
    one half on a tie (as at the start, where the policy is the reference)."""
    return (z > 0).float() + 0.5 * (z == 0).float()


@torch.no_grad()
def reward_margins(policy, reference, batch: LatentBatch, objective: FlowDPOObjective) -> torch.Tensor:
    """z [P] of one paired batch for single-device models (e.g. mugv.models.MUGDiT): what held-out
    reward accuracy is measured with (reward_accuracy(z).mean())."""
    inputs, target = objective.noised_inputs(batch)
    return objective.loss(policy(**inputs), target, batch.x_mask, reference(**inputs)).values["dpo/reward_margin"]


def flow_dpo_loss(err: torch.Tensor, ref_err: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair Flow-DPO loss and reward margin z from per-sample flow errors [2P] (chosen at even,
    rejected at odd positions) of the policy and of the reference (no gradient)."""
    d = err - ref_err.detach()  # [2P]
    z = -0.5 * beta * (d[0::2] - d[1::2])  # [P]
    return -F.logsigmoid(z), z


class FlowDPOObjective(FlowObjective):
    name = "flow_dpo"
    group = 2
    needs_reference = True
    metric_keys = METRICS
    flops_factor = 4 / 3  # + the reference forward (a third of forward + backward)

    def __init__(self, seed: int, text_dropout: float, null_text, shift_ratio: float = 0.0, beta: float = 500.0):
        super().__init__(seed, text_dropout, null_text, shift_ratio)
        if not beta > 0:
            raise ValueError(f"dpo.beta = {beta} must be > 0")
        self.beta = beta

    def noised_inputs(self, batch: LatentBatch) -> tuple[dict, torch.Tensor]:
        if not getattr(batch, "paired", False):
            raise ValueError(f"train.objective=flow_dpo got an unpaired micro-batch ({batch.bucket}, ids {batch.ids[:2]}); "
                             "it needs a pairs dataset (mugv prep --pairs)")
        return super().noised_inputs(batch)

    def loss(self, output: torch.Tensor, target: torch.Tensor, x_mask: torch.Tensor,
             reference: torch.Tensor | None = None) -> ObjectiveLoss:
        if reference is None:
            raise ValueError("flow_dpo needs the reference model's output")
        err = flow_loss(output, target, x_mask)  # [2P]
        with torch.no_grad():
            ref_err = flow_loss(reference, target, x_mask)
        terms, z = flow_dpo_loss(err, ref_err, self.beta)  # [P]
        z = z.detach()
        err = err.detach()
        values = {
            "dpo/reward_accuracy": reward_accuracy(z),
            "dpo/reward_margin": z,
            "dpo/flow_loss_chosen": err[0::2],
            "dpo/flow_loss_rejected": err[1::2],
        }
        return ObjectiveLoss(terms, terms.detach().repeat_interleave(2), values)

"""The DiT forward step: the only place the training loop meets the model.

For one micro-batch the objective (mugv.training.objective) draws timesteps and noise and builds
the model inputs and target; the model predicts; the objective turns the prediction into one loss
term per unit (a sample for rectified flow, a preference pair for Flow-DPO), and the step's loss
is their mean over all units of the step (`sample_mean_loss`). An objective that needs a reference
model (Flow-DPO) gets the reference's prediction of the same inputs (mugv.training.reference),
made in the same forward step, without gradients.

Pipeline parallelism: Megatron's schedules hand each stage one tensor from the previous stage.
With a reference, a stage sends cat([policy hidden, reference hidden], dim=0) (along the
sequence dim, so both halves stay contiguous) and the next stage splits what it receives: the
policy chunk runs on the first half (its gradient flows back through it; the reference half
gets zeros) and the reference on the second. The last stage computes the loss from both outputs.
"""

from __future__ import annotations

import torch

from mugv.checkpoint.keys import unwrap
from mugv.data.batch import LatentBatch, PackedBatch
from mugv.training.objective import FlowObjective, microbatch_generator, per_sample_loss

__all__ = ["DiTForwardStep", "microbatch_generator", "per_sample_loss", "sample_mean_loss"]


def sample_mean_loss(per_sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the per-unit losses, their count): what a loss function returns under Megatron's
    calculate_per_token_loss (set by mugv.models.megatron.megatron_config), with samples (pairs,
    for Flow-DPO) as the "tokens". The schedule sums it over micro-batches and DP,
    mugv.parallel.grads divides the gradients by the step's count: the step's loss is the mean over
    all its units, each counting the same whatever micro-batch or rank it landed in."""
    count = torch.tensor(per_sample.numel(), dtype=torch.int, device=per_sample.device)
    return per_sample.sum(), count


class DiTForwardStep:
    """Megatron forward_step_func: (data_iterator, model) -> (output, loss_func)."""

    def __init__(self, objective: FlowObjective, reference=None):
        if objective.needs_reference and reference is None:
            raise ValueError(f"train.objective={objective.name} needs a reference model")
        self.objective, self.reference = objective, reference

    def __call__(self, data_iterator, model):
        batch: LatentBatch | PackedBatch = next(data_iterator)
        inputs, target = self.objective.noised_inputs(batch)
        ref_out = None
        if self.reference is not None:
            chunk = unwrap(model)
            received = chunk.input_tensor  # [2n, B, C] from the previous stage (None on the first)
            policy_in = ref_in = None
            if not chunk.pre_process and received is not None:
                n = received.shape[0] // 2
                policy_in, ref_in = received[:n], received[n:].detach()
            ref_out = self.reference.forward(model, inputs, ref_in)
            if policy_in is not None:
                chunk.set_input_tensor(policy_in)
        output = model(**inputs)
        if ref_out is not None and not unwrap(model).post_process:
            output = torch.cat([output, ref_out], dim=0)  # [2n, B, C] to the next stage

        def loss_func(out):
            result = self.objective.loss(out, target, inputs["x_mask"], ref_out)
            return *sample_mean_loss(result.terms), {
                "loss": result.terms.detach().mean(),
                "per_sample": result.per_sample,
                "values": result.values,
                "tasks": batch.tasks,
                "ids": batch.ids,
            }

        return output, loss_func

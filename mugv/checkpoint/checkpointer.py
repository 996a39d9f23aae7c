"""Saving and loading a training run's state: every rank writes and reads only its own share.

Layout: <run_dir>/checkpoints/step_XXXXXXXX/ is one dist_checkpointing (torch_dist) directory,
written as `step_X.tmp` and renamed only once every rank has finished, then `latest` is
rewritten atomically: a save killed midway leaves the previous checkpoint as the latest
complete one. What each rank writes (FORMAT.md):
  * `optim.{param,exp_avg,exp_avg_sq}.<key>` and `ema.<key>` (fp32): the rank's own slice of
    each parameter, as rectangles of the model-space tensor (mugv.checkpoint.state). With the
    distributed optimizer the DP x CP ranks' slices are disjoint: each writes 1/DP of the state.
  * `model.<key>` (training dtype): the weights, replicated over DP x CP; Megatron's fully
    parallel save strategy spreads these replicas' writes evenly over the DP x CP group.
  * `common` (rank 0): step, LR schedule, data position, guard, metrics, Adam's step count.
Only the parameters the run trains are saved: with LoRA (frozen base) the adapters, their state
and EMA, and `lora.json` naming where the base comes from (mugv.checkpoint.lora).
Loading at any layout reads only the chunks that overlap what a rank owns there: a resume reads
the optimizer slices and rebuilds the weights from the fp32 main parameters (all-gathered over
DP like after an optimizer step), so it never reads the replicated weights.
"""

from __future__ import annotations

import os
import shutil

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state

from mugv.checkpoint.keys import model_sharded_state_dict
from mugv.checkpoint.locate import COMPLETE, LATEST, MODEL_CONFIG, step_dir_name, step_dirs
from mugv.checkpoint.state import (
    OPTIM_STATES,
    copy_loaded,
    full_shards,
    optimizer_slices,
    optimizers,
    prime_optimizer_state,
    state_tensors,
)
from mugv.utils.checkpoint_io import write_json_atomic
from mugv.utils.logging import get_logger

log = get_logger("checkpoint")


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _save_strategy():
    """torch_dist, with replicated shards' writes spread over the DP x CP group."""
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    return FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(), group)


def optimizer_state(optimizer, model_sd: dict) -> dict:
    """ShardedTensors of this rank's fp32 main parameters and Adam moments (views of the live state)."""
    prime_optimizer_state(optimizer)
    slices = optimizer_slices(optimizer)
    out = {}
    for name in OPTIM_STATES:
        out.update(state_tensors(model_sd, slices, f"optim.{name}.", lambda s, n=name: s.state[n]))
    return out


def adam_step(optimizer) -> int:
    """Adam's update count (the same for every parameter; skipped steps do not count)."""
    steps = [int(st["step"]) for opt in optimizers(optimizer)
             for st in getattr(opt, "optimizer", opt).state.values() if "step" in st]
    return max(steps, default=0)


def trained_weights(model_sd: dict, select: str) -> dict:
    """The entries of `model_sd` to read or write: "all", "trainable" or "frozen" parameters."""
    if select == "all":
        return model_sd
    if select not in ("trainable", "frozen"):
        raise ValueError(f"select must be 'all', 'trainable' or 'frozen', got {select!r}")
    return {k: st for k, st in model_sd.items() if st.data.requires_grad == (select == "trainable")}


def training_state(model, optimizer, ema) -> dict:
    """Everything a rank saves, as ShardedTensors over the live tensors (nothing is copied): the
    weights the run trains (all of them; with LoRA the adapters), their optimizer state and EMA."""
    model_sd = trained_weights(model_sharded_state_dict(model), "trainable")
    state = dict(model_sd)
    state.update(optimizer_state(optimizer, model_sd))
    if ema is not None:
        state.update(ema.state_tensors(model_sd))
    return state


class Checkpointer:
    """Saves every `interval` steps. With async_save the shards are staged to host memory and
    written by a background process while training goes on; the checkpoint is published (renamed
    and made `latest`) when every rank has finished -- checked each step by `maybe_finalize`."""

    def __init__(self, root: str, interval: int, keep_last: int, model_config: dict, config_yaml: str,
                 async_save: bool = False):
        self.root, self.interval, self.keep_last = root, interval, keep_last
        self.model_config, self.config_yaml = model_config, config_yaml
        self.files: dict[str, dict] = {}  # more JSON files written into every checkpoint (lora.json)
        self.queue = None
        if async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self.queue = AsyncCallsQueue()

    def maybe_finalize(self, blocking: bool = False) -> None:
        """Publish finished asynchronous saves (collective: call on every rank)."""
        if self.queue is not None:
            self.queue.maybe_finalize_async_calls(blocking=blocking)

    def maybe_save(self, step: int, model, optimizer, ema, common: dict, force: bool = False) -> str | None:
        """Save every `interval` steps (or when forced); returns the checkpoint path if saved."""
        if force or (self.interval > 0 and step % self.interval == 0):
            return self.save(step, model, optimizer, ema, common)
        return None

    def save(self, step: int, model, optimizer, ema, common: dict) -> str:
        final = os.path.join(self.root, step_dir_name(step))
        tmp = final + ".tmp"
        self.maybe_finalize(blocking=True)  # one save in flight at a time
        if _rank() == 0:
            os.makedirs(self.root, exist_ok=True)
            for name in os.listdir(self.root):
                if name.endswith(".tmp"):
                    shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
            os.makedirs(tmp)
        _barrier()
        state = training_state(model, optimizer, ema)
        state["common"] = {**common, "optimizer": {"adam_step": adam_step(optimizer)}}
        if self.queue is not None:
            request = dist_checkpointing.save(state, tmp, sharded_strategy=_save_strategy(), async_sharded_save=True)
            request.add_finalize_fn(lambda: self._publish(step, tmp, final))
            self.queue.schedule_async_request(request)
            return final
        dist_checkpointing.save(state, tmp, sharded_strategy=_save_strategy())
        self._publish(step, tmp, final)
        return final

    def _publish(self, step: int, tmp: str, final: str) -> None:
        """Once every rank's shards are on disk: metadata, rename into place, point `latest` at it."""
        _barrier()
        if _rank() == 0:
            write_json_atomic(os.path.join(tmp, MODEL_CONFIG), self.model_config)
            for name, obj in self.files.items():
                write_json_atomic(os.path.join(tmp, name), obj)
            with open(os.path.join(tmp, "config.yaml"), "w") as f:
                f.write(self.config_yaml)
            write_json_atomic(os.path.join(tmp, COMPLETE), {"step": step})
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
            with open(os.path.join(self.root, LATEST + ".tmp"), "w") as f:
                f.write(step_dir_name(step))
            os.replace(os.path.join(self.root, LATEST + ".tmp"), os.path.join(self.root, LATEST))
            self._prune()
            log.info(f"saved checkpoint {final}")
        _barrier()

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        for name in step_dirs(self.root)[: -self.keep_last]:
            shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)


def load_checkpoint(path: str, model, optimizer=None, ema=None, use_ema_weights: bool = False,
                    select: str = "all") -> dict:
    """Load this rank's share of a checkpoint at the current layout; returns its common state.

    With `optimizer`: its fp32 main parameters and moments, and the weights rebuilt from the main
    parameters. Without: the weights (`use_ema_weights`: the EMA as weights), `select`: "all",
    "frozen" (a LoRA run's base) or "trainable" (its adapters). With `ema`: the EMA."""
    common = (dist_checkpointing.load_common_state_dict(path) or {}).get("common") or {}
    if optimizer is not None and "optimizer" not in common:
        raise KeyError(f"{path}: no optimizer state (a weights-only checkpoint); load without the optimizer")
    model_sd = trained_weights(model_sharded_state_dict(model), select)
    if optimizer is not None:
        template = optimizer_state(optimizer, model_sd)
    elif use_ema_weights:
        template = full_shards(model_sd, "ema.")
    else:
        template = dict(model_sd)  # read straight into the parameters
    if ema is not None:
        template.update(ema.state_tensors(model_sd))
    copy_loaded(template, dist_checkpointing.load(template, path))
    if optimizer is not None:
        for opt in optimizers(optimizer):
            for st in getattr(opt, "optimizer", opt).state.values():
                if "step" in st:
                    st["step"] = torch.tensor(float(common["optimizer"]["adam_step"]))  # one per parameter
        weights_from_main_params(model, optimizer)
    elif use_ema_weights:
        with torch.no_grad():
            for name, st in model_sd.items():
                st.data.copy_(template["ema." + name.split(".", 1)[1]].data)
    return common


@torch.no_grad()
def weights_from_main_params(model, optimizer) -> None:
    """Model weights from the optimizer's fp32 main parameters: each rank writes its own slice and
    the distributed optimizer's param all-gather completes them (as after an optimizer step)."""
    for opt in optimizers(optimizer):
        if hasattr(opt, "_copy_main_params_to_model_params"):
            opt._copy_main_params_to_model_params()
    for chunk in model:
        if chunk.ddp_config.use_distributed_optimizer:
            chunk.start_param_sync(force_sync=True)

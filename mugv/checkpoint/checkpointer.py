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

Integrity (mugv.checkpoint.integrity): each rank checksums the files it wrote (in the background
process of an asynchronous save); rank 0 gathers the sums into `complete.json`. A load first
verifies the checkpoint, each rank its share of the files, and raises CheckpointCorruptError
naming every bad file. A save that fails (a full disk) raises CheckpointSaveError naming the path;
the previous checkpoint stays the latest. Pruning removes a checkpoint's marker before its files.
"""

from __future__ import annotations

import errno
import os
import queue
import shutil
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from torch.distributed.checkpoint.api import CheckpointException

from mugv.checkpoint.integrity import (
    CheckpointCorruptError,
    checksums,
    gather_sums,
    own_files,
    read_sums,
    verify_collective,
    write_then_checksum,
    writer_of,
)
from mugv.checkpoint.keys import model_sharded_state_dict
from mugv.checkpoint.locate import (
    COMPLETE,
    MODEL_CONFIG,
    is_complete,
    latest_checkpoint,
    remove_checkpoint,
    step_dir_name,
    step_dirs,
    step_of,
    write_latest,
)
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
_LOW_SPACE = 2**24  # bytes free under which a failed write is taken for a full disk


class CheckpointSaveError(RuntimeError):
    """Writing a checkpoint failed; the previous checkpoint is untouched."""


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


def replicated_load_strategy(path: str):
    """For tensors every DP x CP replica holds (weights, not optimizer slices): each replica reads
    its share of the files and they exchange the rest (broadcast), so a rank reads 1/(DP x CP) of
    its weights instead of all of them. None (the plain strategy) without replicas."""
    from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper

    if not parallel_state.model_parallel_is_initialized():
        return None
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    if group.size() == 1:
        return None
    return FullyParallelLoadStrategyWrapper(get_default_load_sharded_strategy(path), group)


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
        self.queue, self._pending = None, ""
        self.healthy = -1  # the newest step whose state gave a normal loss (set by the trainer)
        if async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self.queue = AsyncCallsQueue()

    def maybe_finalize(self, blocking: bool = False) -> None:
        """Publish finished asynchronous saves (collective: call on every rank)."""
        if self.queue is not None:
            try:
                self.queue.maybe_finalize_async_calls(blocking=blocking)
            except CheckpointSaveError:
                raise
            except (Exception, CheckpointException) as err:
                raise save_error(err, self._pending, self.root) from err

    def maybe_save(self, step: int, model, optimizer, ema, common: dict, force: bool = False) -> str | None:
        """Save every `interval` steps (or when forced); returns the checkpoint path if saved."""
        if force or (self.interval > 0 and step % self.interval == 0):
            return self.save(step, model, optimizer, ema, common)
        return None

    def save(self, step: int, model, optimizer, ema, common: dict) -> str:
        final = os.path.join(self.root, step_dir_name(step))
        tmp = final + ".tmp"
        self.maybe_finalize(blocking=True)  # one save in flight at a time
        try:
            if _rank() == 0:
                os.makedirs(self.root, exist_ok=True)
                for name in os.listdir(self.root):  # left by a save that was killed (the run lock
                    if name.endswith(".tmp"):       # keeps other runs out of this directory)
                        shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
                os.makedirs(tmp)
            _barrier()
            state = training_state(model, optimizer, ema)
            state["common"] = {**common, "optimizer": {"adam_step": adam_step(optimizer)}}
            _plain_results_queue(self.queue is not None)
            if self.queue is not None:
                request = dist_checkpointing.save(state, tmp, sharded_strategy=_save_strategy(), async_sharded_save=True)
                if request.async_fn is not None:  # the writer process checksums what it wrote
                    request = request._replace(async_fn=partial(write_then_checksum, request.async_fn, tmp, _rank()))
                request.add_finalize_fn(lambda: self._publish(step, tmp, final, None))
                self._pending = tmp
                self.queue.schedule_async_request(request)
                return final
            dist_checkpointing.save(state, tmp, sharded_strategy=_save_strategy())
            self._publish(step, tmp, final, checksums(tmp, own_files(tmp, _rank())))
        except (Exception, CheckpointException) as err:  # (torch's CheckpointException is a BaseException)
            raise save_error(err, tmp, self.root) from err
        return final

    def _publish(self, step: int, tmp: str, final: str, own: dict | None) -> None:
        """Once every rank's shards are on disk: checksums and metadata, then rename into place and
        point `latest` at it."""
        _barrier()
        if own is None:  # an asynchronous save: the sums come from this rank's writer process
            own = read_sums(tmp, _rank())
        files = gather_sums(own)
        if _rank() == 0:
            write_json_atomic(os.path.join(tmp, MODEL_CONFIG), self.model_config)
            for name, obj in self.files.items():
                write_json_atomic(os.path.join(tmp, name), obj)
            with open(os.path.join(tmp, "config.yaml"), "w") as f:
                f.write(self.config_yaml)
            small = [n for n in os.listdir(tmp) if writer_of(n) is None and n != COMPLETE]
            files.update(checksums(tmp, small))
            write_json_atomic(os.path.join(tmp, COMPLETE), {"step": step, "files": files})
            if os.path.isdir(final):
                remove_checkpoint(final)
            os.replace(tmp, final)
            write_latest(self.root, step_dir_name(step))
            self._prune()
            log.info(f"saved checkpoint {final}")
        _barrier()

    def _prune(self) -> None:
        """Keep the newest keep_last complete checkpoints and the newest one at or before
        `self.healthy` (the newest step the trainer saw a normal loss from); remove the other
        older ones (marker first)."""
        if self.keep_last <= 0:
            return
        names = step_dirs(self.root)
        complete = [n for n in names if is_complete(os.path.join(self.root, n))]
        keep = set(complete[-self.keep_last :])
        safe = [n for n in complete if step_of(n) <= self.healthy]
        if safe:
            keep.add(safe[-1])
        for name in names:
            if keep and name not in keep and name < max(keep):
                remove_checkpoint(os.path.join(self.root, name))


def _plain_results_queue(async_save: bool) -> None:
    """megatron-core 0.16.1 collects its writer processes' results through a multiprocessing Manager
    that it spawns at the first save (filesystem_async._results_queue): a process in the rank's
    process group, so a SIGTERM to that group (torchrun's, a scheduler's) kills it and the save in
    progress dies with BrokenPipeError; and it outlives a rank that ends with os._exit. A plain
    queue does for a synchronous save (filled and read in this process); the writer of an
    asynchronous save is a forked process, which inherits a pipe-backed queue made here."""
    import torch.multiprocessing as mp
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    filesystem_async._results_queue = mp.get_context("fork").Queue() if async_save else queue.Queue()


def save_error(err: BaseException, path: str, root: str) -> CheckpointSaveError:
    """A save failure described: a full disk says so and names the path; the previous checkpoint."""
    chain, todo = [], [err]
    while todo and len(chain) < 64:  # causes, and the per-rank failures a CheckpointException carries
        e = todo.pop()
        chain.append(e)
        todo += [x for x in (e.__cause__, e.__context__) if x is not None]
        todo += [f[0] if isinstance(f, tuple) else f for f in getattr(e, "failures", {}).values()]
    try:
        free = shutil.disk_usage(root if os.path.isdir(root) else os.path.dirname(root) or ".").free
    except OSError:
        free = -1
    full = any(isinstance(c, OSError) and c.errno == errno.ENOSPC or "No space left" in str(c) for c in chain)
    previous = latest_checkpoint(root) if os.path.isdir(root) else None
    kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
    if full or 0 <= free < _LOW_SPACE:
        return CheckpointSaveError(
            f"saving checkpoint {path} failed: the disk is full ({free} bytes free on the file system of {root}); "
            f"{kept}. Free space (or move run_dir) and run again; error: {type(err).__name__}: {err}"
        )
    return CheckpointSaveError(f"saving checkpoint {path} failed: {type(err).__name__}: {err}; {kept}")


def load_checkpoint(path: str, model, optimizer=None, ema=None, use_ema_weights: bool = False,
                    select: str = "all") -> dict:
    """Load this rank's share of a checkpoint at the current layout; returns its common state.
    Collective: the checkpoint is verified first (CheckpointCorruptError names the bad files).

    With `optimizer`: its fp32 main parameters and moments, and the weights rebuilt from the main
    parameters. Without: the weights (`use_ema_weights`: the EMA as weights), `select`: "all",
    "frozen" (a LoRA run's base) or "trainable" (its adapters). With `ema`: the EMA."""
    problems = verify_collective(path)
    if problems:
        raise CheckpointCorruptError(path, problems)
    try:
        common = (dist_checkpointing.load_common_state_dict(path) or {}).get("common") or {}
    except Exception as err:  # a checkpoint without checksums: still name the file
        raise CheckpointCorruptError(path, [f"{path}/common.pt: unreadable ({type(err).__name__}: {err})"]) from err
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
    strategy = None if optimizer is not None else replicated_load_strategy(path)  # slices are each rank's own
    copy_loaded(template, dist_checkpointing.load(template, path, sharded_strategy=strategy))
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

"""The training loop. Side concerns (checkpoints, EMA, metrics, signals, the run lock, the hang
watchdog) are objects; the model is met only through the forward-step function
(mugv.training.step) and the objective it calls (mugv.training.objective; with Flow-DPO also a
reference model, mugv.training.reference). Reliability (README "Reliability"): one run per run directory (rank 0 holds
<run_dir>/.lock); a resume takes the newest checkpoint that verifies (mugv.training.recovery); a
step whose micro-batch came out empty is skipped on every rank and counted; a divergence leaves
`latest` at the last healthy checkpoint; bad samples are shared at log steps and listed in
<run_dir>/quarantine.jsonl; per-rank step times go to the metrics."""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from omegaconf import OmegaConf

from mugv.checkpoint import resolve
from mugv.checkpoint.checkpointer import CheckpointCorruptError, Checkpointer, load_checkpoint
from mugv.checkpoint.locate import set_aside, write_latest
from mugv.checkpoint.lora import LORA_RECORD, placed
from mugv.config import to_dict
from mugv.data.dataset import BadDataError
from mugv.data.loader import LatentLoader
from mugv.models.flops import sample_cost
from mugv.models.megatron import packed_sequence_length, padded_sequence_length
from mugv.parallel import failfast
from mugv.parallel.failfast import fail_fast
from mugv.parallel.runtime import init_distributed
from mugv.parallel.watchdog import RankWatchdog
from mugv.training import lora
from mugv.training.build import build_megatron_config, build_model, build_optimizer
from mugv.training.config import TrainConfig
from mugv.training.datafaults import DataFaults
from mugv.training.ema import ShardedEMA
from mugv.training.guards import DivergenceError, NonFiniteGuard, StopSignals, TimeBudget, agree_all
from mugv.training.metrics import MetricsLogger, dp_sum
from mugv.training.objective import make_objective
from mugv.training.preview import Previewer
from mugv.training.recovery import (
    StopMarker,
    abnormal,
    keep_healthy,
    last_healthy_step,
    microbatches_for,
    resume_candidates,
)
from mugv.training.reference import make_reference
from mugv.training.schedule import LRSchedule
from mugv.training.step import DiTForwardStep
from mugv.training.straggler import StepTimes
from mugv.utils.logging import get_logger
from mugv.utils.runlock import RunLock, job_id

log = get_logger("train")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg, p = cfg, cfg.parallel
        self.dist = init_distributed(tp=p.tp, pp=p.pp, cp=p.cp, vpp=p.vpp, seed=cfg.train.seed)
        self.lock = RunLock(cfg.run_dir, job_id(os.environ)) if self.dist.rank == 0 else None
        if self.lock is not None:  # before anything is written into the run directory
            self.lock.acquire()
            failfast.at_exit(self.lock.release)
            StopMarker(cfg.run_dir).check()
        self.dit = cfg.model.build()
        self.mcfg = build_megatron_config(cfg, self.dit)
        self.model = build_model(cfg, self.mcfg, self.dist.device)
        self.optimizer = build_optimizer(cfg, self.mcfg, self.model)
        self.ema = ShardedEMA(self.optimizer, cfg.ema.decay) if cfg.ema.decay > 0 else None
        dp_rank = parallel_state.get_data_parallel_rank()
        self.data = LatentLoader(cfg.data, dp_rank, parallel_state.get_data_parallel_world_size(),
                                 cfg.train.microbatches, sample_cost(self.dit, cfg.data.text_len))
        self.faults = DataFaults(self.data, cfg, self.dist.rank, self.dist.world_size)
        self.objective = make_objective(cfg.train, cfg.dpo, self.data.text_embeddings.get("null"))
        if self.data.paired != (self.objective.group == 2):
            raise ValueError(f"data.paths {cfg.data.paths}: " + (
                "a pairs dataset needs train.objective=flow_dpo" if self.data.paired else
                f"train.objective={self.objective.name} needs a pairs dataset (mugv prep --pairs)"))
        # the reference starts as the policy's initial weights (resume() loads train.init_from into it)
        self.reference = make_reference(self.mcfg, self.model, self.dist.device) if self.objective.needs_reference else None
        self.forward_step = DiTForwardStep(self.objective, self.reference)
        self.schedule = LRSchedule(cfg.optim, cfg.train.steps)
        config_yaml = OmegaConf.to_yaml(OmegaConf.structured(cfg))
        ckpt_root = os.path.join(cfg.run_dir, "checkpoints")
        self.ckpt = Checkpointer(ckpt_root, cfg.checkpoint.interval, cfg.checkpoint.keep_last, self.dit.to_dict(),
                                 config_yaml, async_save=cfg.checkpoint.async_save)
        self.guard = NonFiniteGuard(cfg.train.max_nonfinite_in_row)
        self.signals, self.budget = StopSignals(), TimeBudget(cfg.train.time_budget_minutes)
        self.watchdog = RankWatchdog(cfg.watchdog, on_orphan=self.signals.request)
        self.times = StepTimes(self.dist.rank, self.dist.world_size, cfg.run_dir, self.dist.device)
        self._finalize_grads, self.mcfg.finalize_model_grads_func = self.mcfg.finalize_model_grads_func, self._grad_sync
        self._t_sync = 0.0
        self.preview = Previewer(cfg.preview, cfg.run_dir, shift_ratio=cfg.train.shift_ratio)
        self.step = 0
        self.resumed, self.resumed_metrics = False, None
        self.history: list[float] = []  # loss per step (last pipeline stage; 0 elsewhere)
        self.logged: list[dict | None] = []  # what the metrics logger logged (rank 0)
        if self.dist.rank == 0:
            os.makedirs(cfg.run_dir, exist_ok=True)
            with open(os.path.join(cfg.run_dir, "config.yaml"), "w") as f:
                f.write(config_yaml)

    # -- state ---------------------------------------------------------------------------------

    def common_state(self) -> dict:
        return {
            "step": self.step,
            "data": self.data.state_dict(),
            "schedule": self.schedule.state_dict(),
            "guard": self.guard.state_dict(),
            "metrics": self.metrics.state_dict(),
            "global_microbatches": parallel_state.get_data_parallel_world_size() * self.cfg.train.microbatches,
            "skipped_data_steps": self.faults.skipped_steps,
        }

    def resume(self) -> None:
        """Continue this run from its newest checkpoint that verifies (one that does not is set aside
        as *.corrupt, naming its bad files), else start from train.init_from."""
        self.resumed = True
        path, skipped = None, []
        for candidate in resume_candidates(self.ckpt.root):
            try:
                record = self._frozen_base(candidate)
                common = load_checkpoint(candidate, self.model, self.optimizer, self.ema)
            except CheckpointCorruptError as err:
                if os.path.abspath(err.path) != os.path.abspath(candidate):  # e.g. a LoRA run's base
                    raise
                log.error(f"{err}; setting it aside and trying the checkpoint before it")
                if self.dist.rank == 0:
                    skipped.append(set_aside(candidate, "corrupt"))
                _barrier()
                continue
            path = candidate
            break
        if path:
            if record is not None:
                self.ckpt.files[LORA_RECORD] = placed(record, self.ckpt.root)
            if skipped and self.dist.rank == 0:
                write_latest(self.ckpt.root, os.path.basename(path))
                log.warning(f"resuming from {path}, the newest checkpoint that verifies (set aside: {skipped})")
            self.step = int(common["step"])
            self.data.load_state_dict(common["data"])
            self.schedule.load_state_dict(common["schedule"])
            self.guard.load_state_dict(common["guard"])
            self.resumed_metrics = common["metrics"]
            self.faults.skipped_steps = int(common.get("skipped_data_steps", 0))
            dp = parallel_state.get_data_parallel_world_size()
            self.cfg.train.microbatches = microbatches_for(self.cfg, common.get("global_microbatches"), dp)
            self.data.set_microbatches(self.cfg.train.microbatches)
            log.info(f"resumed from {path} at step {self.step}")
        elif self.cfg.train.init_from:
            t = self.cfg.train
            path = resolve(t.init_from)
            opt = self.optimizer if t.init_load_optimizer else None
            if self.cfg.lora.rank:  # Flow-DPO: fresh adapters (its reference is the start with them off)
                record = lora.start_from(self.cfg, path, self.model, opt, fresh=self.reference is not None)
                self.ckpt.files[LORA_RECORD] = placed(record, self.ckpt.root)
            else:  # a LoRA checkpoint: its merged weights
                lora.full_start(self.cfg, path, self.model, opt)
            if opt is None:
                self.optimizer.reload_model_params()  # main fp32 params from the loaded weights
            if self.ema is not None:
                self.ema = ShardedEMA(self.optimizer, self.cfg.ema.decay)
            log.info(f"initialised from {path} ({'EMA' if t.init_use_ema else 'raw'} weights)")
        if self.reference is not None and self.cfg.train.init_from:  # the weights the run started from
            self.reference.load(resolve(self.cfg.train.init_from), use_ema=self.cfg.train.init_use_ema)

    def _frozen_base(self, path: str) -> dict | None:
        """A LoRA run's resume: load the frozen base that checkpoint `path`'s lora.json names, and
        return that record; a full-parameter run refuses a LoRA checkpoint."""
        if self.cfg.lora.rank:
            return lora.resume_base(self.cfg, path, self.model)
        lora.check_no_lora(path)
        return None

    # -- one step --------------------------------------------------------------------------------

    def train_step(self, batches) -> dict:
        self.schedule.apply(self.optimizer, self.step)
        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        one = len(self.model) == 1
        results = get_forward_backward_func()(
            forward_step_func=self.forward_step,
            data_iterator=iter(batches) if one else [iter(batches) for _ in self.model],
            model=self.model[0] if one else self.model,
            num_microbatches=len(batches),
            seq_length=max(sequence_length(self.mcfg, b) for b in batches),
            micro_batch_size=max(len(b) if len(b.parts) == 1 else 1 for b in batches),
            forward_only=False,
        )
        losses = [r["per_sample"] for r in results]  # only the last pipeline stage has them
        loss = torch.cat(losses).mean() if losses else torch.zeros(())  # this rank's samples
        found_inf = self.optimizer.prepare_grads()
        grad_norm = float(self.optimizer.get_grad_norm())  # the one grad-norm reduction of the step
        ids = [i for b in batches for i in b.ids]
        applied = self.guard.check(self.step, float("nan") if found_inf else loss, grad_norm, ids)
        if applied:
            if self.cfg.optim.clip_grad > 0:
                clip_grads_(self.optimizer, self.cfg.optim.clip_grad, grad_norm)
            self.optimizer.step_with_ready_grads()
            if self.ema is not None:
                self.ema.update()
        return {"results": results, "loss": float(loss), "applied": applied, "grad_norm": grad_norm,
                "lr": self.schedule.lr(self.step)}

    # -- the loop --------------------------------------------------------------------------------

    def make_metrics(self) -> MetricsLogger:
        """Per-sample metrics are recorded once per sample: on the last pipeline stage by TP/CP
        rank 0 of each data-parallel replica, then summed over all ranks."""
        self.records_metrics = (
            parallel_state.is_pipeline_last_stage()
            and parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_context_parallel_rank() == 0
        )
        return MetricsLogger(
            self.cfg.logging, self.cfg.run_dir, self.dist.rank, self.dit, self.dist.world_size,
            self.cfg.train.steps, buckets=sorted({r.bucket for r in self.data.records}),
            reduce_fn=dp_sum(None) if dist.is_initialized() else None, device=self.dist.device,
            start_step=self.step, run_config=to_dict(self.cfg),
            value_keys=self.objective.metric_keys, flops_factor=self.objective.flops_factor,
        )

    def _grad_sync(self, *args, **kwargs):
        """Megatron's finalize_model_grads_func, wrapped: this rank's compute of the step is done."""
        self._t_sync = time.perf_counter()
        self.watchdog.mark(self.step, "sync")
        return self._finalize_grads(*args, **kwargs)

    def run(self) -> int:
        if not self.resumed:
            self.resume()
        self.metrics = self.make_metrics()
        if self.resumed_metrics:
            self.metrics.load_state_dict(self.resumed_metrics)
        self.preview.setup(self.dist.device)
        self.metrics.reset_timer()
        total, M = self.cfg.train.steps, self.cfg.train.microbatches
        data = iter(self.data)
        try:
            while self.step < total:
                self.watchdog.begin(self.step)
                t0 = time.perf_counter()
                batches = [next(data) for _ in range(M)]
                t_data = time.perf_counter() - t0
                if self.faults.skip_empty(batches, self.step):
                    continue
                self.watchdog.mark(self.step, "compute")
                t1 = self._t_sync = time.perf_counter()
                out = self.train_step([b.to(self.dist.device) for b in batches])
                self.times.record(t_data, self._t_sync - t1)
                if self.records_metrics:  # host copies of the batches: no device sync for text lengths
                    for b, r in zip(batches, out["results"]):
                        k = 0
                        for part in b.parts:
                            self.metrics.record_samples(r["per_sample"][k : k + len(part)], part.tasks, part.bucket,
                                                        tuple(part.latents.shape[2:]), part.mask.sum(1).tolist())
                            k += len(part)
                        self.metrics.record_values(r["values"])
                unhealthy = not out["applied"] or abnormal(out["loss"], self.history)  # the state of this step
                self.step += 1
                self.watchdog.end(self.step)
                self.history.append(out["loss"])
                self.metrics.record_step(out["lr"], out["grad_norm"], skipped=not out["applied"], data_wait_s=t_data)
                extra = {**self.faults.share(), **self.times.values(self.step)} if self.metrics.due(self.step) else None
                self.logged.append(self.metrics.maybe_log(self.step, extra))
                stop, unhealthy = agree_all([self.signals.requested or self.budget.expired(), unhealthy])
                if not unhealthy:  # pruning keeps the newest checkpoint up to this state
                    self.ckpt.healthy = self.step - 1
                self.ckpt.maybe_save(self.step, self.model, self.optimizer, self.ema, self.common_state(),
                                     force=stop or self.step == total)
                self.preview.maybe_preview(self.step, self.model, self.mcfg, self.optimizer, self.ema, self.metrics,
                                           self.dist.device)
                self.ckpt.maybe_finalize()
                if stop:
                    why = self.signals.signal_name or ("time budget" if self.budget.expired() else "another rank's signal")
                    log.info(f"stopping at step {self.step} on request ({why}); checkpoint saved")
                    break
            self.ckpt.maybe_finalize(blocking=True)
        except DivergenceError as err:
            raise self.diverged(err) from None
        except BadDataError as err:
            StopMarker(self.cfg.run_dir).write(str(err))
            raise
        finally:
            self.watchdog.stop()
        self.metrics.close()
        self.signals.uninstall()
        if self.lock is not None:
            self.lock.release()
        return 0

    def diverged(self, err: DivergenceError) -> DivergenceError:
        """Leave `latest` at the last healthy checkpoint (every rank is here at the same step: the
        guard's decision is agreed); returns the error to raise, saying what to change."""
        self.ckpt.maybe_finalize(blocking=True)
        healthy = last_healthy_step(self.history, self.step - len(self.history), err.first_step)
        if dist.is_initialized():  # the most careful rank decides (losses live on the last stage)
            t = torch.tensor([healthy], dtype=torch.int64, device=self.dist.device)
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
            healthy = int(t.item())
        message = [""]
        if self.dist.rank == 0:
            message[0] = keep_healthy(self.ckpt.root, healthy, err.first_step, self.cfg)
            StopMarker(self.cfg.run_dir).write(f"{err} {message[0]}")
        if dist.is_initialized():  # (before any rank raises) every rank's error says where the run resumes
            dist.broadcast_object_list(message, src=0)
        return DivergenceError(f"{err}. {message[0]}", err.first_step)


def sequence_length(mcfg, batch) -> int:
    """The padded DiT sequence length of a micro-batch (Megatron's `seq_length`)."""
    if len(batch.parts) == 1:
        return padded_sequence_length(mcfg, *batch.parts[0].latents.shape[2:])
    return packed_sequence_length(mcfg, [tuple(p.latents.shape[2:]) for p in batch.parts for _ in range(len(p))])


def clip_grads_(optimizer, max_norm: float, total_norm: float) -> None:
    """Scale the optimizer's gradients in place so that their global norm is at most max_norm
    (Megatron's rule: coefficient max_norm / (norm + 1e-6), applied when below 1), in one pass."""
    coeff = max_norm / (total_norm + 1.0e-6)
    if coeff < 1.0:
        opts = getattr(optimizer, "chained_optimizers", [optimizer])
        grads = [p.grad for opt in opts for p in opt.get_parameters() if p.grad is not None]
        torch._foreach_mul_(grads, coeff)


def train(cfg: TrainConfig) -> int:
    """One training run on this rank. An exception on any rank ends every rank promptly, non-zero
    (mugv.parallel.failfast); a normal end waits for all ranks."""
    with fail_fast():
        code = Trainer(cfg).run()
    if dist.is_initialized():
        dist.barrier()
    return code

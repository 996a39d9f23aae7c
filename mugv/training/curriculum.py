"""A curriculum: training stages run in order, each one torchrun of `mugv train`, each starting
from the weights of the one before.

File format (configs/curriculum/*.yaml, loaded as `CurriculumConfig`; unknown keys fail):

    root: runs/mugv_10b            # run dirs are <root>/<stage name> (`--root` overrides)
    overrides: [data.num_workers=4]  # applied to every stage
    stages:
      - name: a_image256           # [A-Za-z0-9_.-]+, unique
        config: ../stages/10b_a_image256.yaml  # a complete TrainConfig YAML, relative to this file
        nnodes: 8                  # nodes x processes per node (one process per GPU)
        nproc: 8
        overrides: [optim.lr=1e-4] # this stage only
        init: none                 # previous | none | <checkpoint, run or checkpoints dir>
        load_optimizer: false      # with init: also take the optimizer state (same parameters only)
        use_ema: false             # with init: start from the EMA weights

A stage's config is resolved as: stage file <- curriculum `overrides` <- stage `overrides` <-
command-line overrides <- what the curriculum sets (run_dir, train.init_from,
train.init_load_optimizer, train.init_use_ema; giving these yourself is an error). Every stage
is loaded and validated before anything starts. Other paths (init, data) are relative to the
working directory, as in `mugv train`.

Running: a stage whose run dir holds a complete checkpoint at train.steps is skipped; otherwise
`python -m torch.distributed.run ... -m mugv.cli.main train <config> <overrides>` is started
(mugv.parallel.launch) and
the trainer resumes from the stage's own latest checkpoint, or else starts from `init` (for
`previous`, the run dir of the stage before -- at any parallel layout; after a LoRA stage, a
full-parameter stage starts from its merged weights, mugv.training.lora). A stage that exits
without reaching train.steps (a pre-emption signal or time budget: the trainer saved and exited
cleanly) or that fails stops the curriculum; running it again continues where it stopped.

Launch: on one machine torchrun runs `--standalone`. For several nodes, run the curriculum on
every node (scripts/train_multi_node.sh, scripts/train_slurm.sbatch) with NNODES, NODE_RANK,
MASTER_ADDR and MASTER_PORT set; each stage then uses c10d rendezvous at MASTER_ADDR:MASTER_PORT
with rendezvous id = the stage name, and must ask for exactly NNODES nodes. Run dirs must be on
a file system all nodes share. SIGTERM / SIGUSR1 / SIGINT received by the curriculum process go
to the stage's agent (mugv.parallel.agent), which has the training processes finish the step,
save and exit; no later stage is started after such a signal. A stage whose run directory a
live run holds is refused (mugv.utils.runlock); train.max_restarts of a stage is torchrun's
restart count for it.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from mugv.config import ConfigError, find_config, load_config
from mugv.parallel.launch import Rendezvous, SignalRelay, launch_env
from mugv.training.config import TrainConfig
from mugv.utils.logging import get_logger
from mugv.utils.runlock import check_free

log = get_logger("curriculum")
RESERVED = ("run_dir", "train.init_from", "train.init_load_optimizer", "train.init_use_ema")
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_EMPTY = '""'  # an empty string in a dotlist override (a bare `key=` is null)
_FS_SETTLE_S = 30.0  # multi-node: how long a finished stage's checkpoint may take to appear


@dataclass
class StageEntry:
    name: str = ""
    config: str = ""
    nproc: int = 1  # processes per node
    nnodes: int = 1
    overrides: list[str] = field(default_factory=list)
    init: str = "previous"
    load_optimizer: bool = False
    use_ema: bool = False


@dataclass
class CurriculumConfig:
    root: str = "runs/curriculum"
    overrides: list[str] = field(default_factory=list)
    stages: list[StageEntry] = field(default_factory=list)

    def validate(self) -> None:
        if not self.stages:
            raise ValueError("stages: the curriculum has no stages")
        seen = set()
        for i, s in enumerate(self.stages):
            where = f"stages[{i}]"
            if not _NAME.match(s.name):
                raise ValueError(f"{where}.name = {s.name!r} must be non-empty [A-Za-z0-9_.-]")
            if s.name in seen:
                raise ValueError(f"{where}.name = {s.name!r} is used twice")
            seen.add(s.name)
            if not s.config:
                raise ValueError(f"{where} ({s.name}): config is missing")
            if s.nproc < 1 or s.nnodes < 1:
                raise ValueError(f"{where} ({s.name}): nproc and nnodes must be >= 1")
            if not s.init:
                raise ValueError(f"{where} ({s.name}): init is empty (use 'none', 'previous' or a path)")
            if i == 0 and s.init == "previous":
                raise ValueError(
                    f"{where} ({s.name}) is the first stage: init must be 'none' or a checkpoint path"
                )
            if s.init == "none" and (s.load_optimizer or s.use_ema):
                raise ValueError(f"{where} ({s.name}): load_optimizer/use_ema need an init")


@dataclass
class Stage:
    """One stage, resolved: its validated TrainConfig and how `mugv train` gets it."""

    name: str
    config_path: str
    overrides: list[str]  # everything after the config file on the `mugv train` command line
    cfg: TrainConfig
    nnodes: int
    nproc: int

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc


@dataclass
class StageResult:
    name: str
    run_dir: str
    status: str  # "skipped" (already complete), "completed", "interrupted", "failed", "planned" (dry run)
    step: int | None  # step of the stage's latest complete checkpoint afterwards (None: none)
    steps: int  # train.steps of the stage
    returncode: int | None = None
    command: list[str] = field(default_factory=list)
    plan: str = ""  # dry run: layout and memory estimate (mugv.training.plan.describe)


def load_curriculum(path: str) -> CurriculumConfig:
    """The curriculum file, validated, with stage config paths made absolute."""
    path = find_config(path)
    cur = load_config(CurriculumConfig, path)
    base = os.path.dirname(os.path.abspath(path))
    for s in cur.stages:
        s.config = os.path.normpath(os.path.join(base, s.config))
    return cur


def _reserved(overrides: Sequence[str], where: str) -> None:
    for o in overrides:
        key = o.split("=", 1)[0].strip()
        if key in RESERVED:
            raise ConfigError(
                f"{where}: override {o!r} sets {key}, which the curriculum sets "
                "(use --root and the stage's init/load_optimizer/use_ema)"
            )


def resolve_stages(path: str, root: str | None = None, overrides: Sequence[str] = ()) -> list[Stage]:
    """Load and validate every stage's TrainConfig (fails before anything runs)."""
    cur = load_curriculum(path)
    root = root or cur.root
    _reserved(cur.overrides, path)
    _reserved(overrides, "command line")
    stages: list[Stage] = []
    for i, entry in enumerate(cur.stages):
        _reserved(entry.overrides, f"{path}: stage {entry.name!r}")
        init = (
            ""
            if entry.init == "none"
            else (os.path.join(root, cur.stages[i - 1].name) if entry.init == "previous" else entry.init)
        )
        ovr = [
            *cur.overrides,
            *entry.overrides,
            *overrides,
            f"run_dir={os.path.join(root, entry.name)}",
            f"train.init_from={init or _EMPTY}",
            f"train.init_load_optimizer={str(entry.load_optimizer).lower()}",
            f"train.init_use_ema={str(entry.use_ema).lower()}",
        ]
        try:
            cfg = load_config(TrainConfig, entry.config, ovr)
        except ConfigError as err:
            raise ConfigError(f"{path}: stage {entry.name!r}: {err}") from None
        if entry.init == "previous":
            _check_hand_over(stages[-1], entry.name, cfg, entry.load_optimizer, path)
        stages.append(Stage(entry.name, entry.config, ovr, cfg, entry.nnodes, entry.nproc))
    return stages


def _check_hand_over(prev: Stage, name: str, cfg: TrainConfig, load_optimizer: bool, path: str) -> None:
    """What a stage can take from the LoRA or full stage before it (mugv.training.lora): a LoRA
    stage after a LoRA stage continues its adapters (same settings) unless it is Flow-DPO (fresh
    adapters on the merged weights); load_optimizer only where the same parameters are trained."""
    a, b = prev.cfg.lora, cfg.lora
    same = (a.rank, a.alpha, list(a.targets)) == (b.rank, b.alpha, list(b.targets))
    continues = a.rank and b.rank and cfg.train.objective == "flow"
    where = f"{path}: stage {name!r}"
    if continues and not same:
        raise ConfigError(f"{where} continues the LoRA adapters of stage {prev.name!r}, which are lora.rank={a.rank}, "
                          f"lora.alpha={a.alpha}, lora.targets={list(a.targets)}; this stage has lora.rank={b.rank}, "
                          f"lora.alpha={b.alpha}, lora.targets={list(b.targets)}")
    if load_optimizer and (a.rank or b.rank) and not continues:
        what = "LoRA adapters" if a.rank else "all parameters"
        raise ConfigError(f"{where}: load_optimizer, but stage {prev.name!r} trains {what} and this one does not "
                          f"continue them (lora.rank {a.rank} -> {b.rank}, train.objective={cfg.train.objective}): "
                          "its optimizer state does not apply; set load_optimizer: false")


def stage_command(rendezvous: Rendezvous, stage: Stage) -> list[str]:
    """The torchrun command of a stage (rendezvous id = the stage name)."""
    return rendezvous.command(stage.nproc, ["train", stage.config_path, *stage.overrides], rdzv_id=stage.name,
                              max_restarts=stage.cfg.train.max_restarts,
                              orphan_grace_s=stage.cfg.watchdog.orphan_grace_s)


def checkpoint_step(run_dir: str) -> int | None:
    """The step of the run's latest complete checkpoint (None when it has none)."""
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):  # (spares a new run's dry run the Megatron import)
        return None
    from mugv.checkpoint import COMPLETE, latest_checkpoint

    path = latest_checkpoint(root)
    if path is None:
        return None
    with open(os.path.join(path, COMPLETE)) as f:
        return int(json.load(f)["step"])


def run_curriculum(
    path: str,
    root: str | None = None,
    overrides: Sequence[str] = (),
    dry_run: bool = False,
    env: Mapping[str, str] | None = None,
) -> list[StageResult]:
    """Run (or with dry_run, describe) the stages of a curriculum file in order; see the module
    docstring. Returns one result per stage reached; the last is the one that stopped it, if any."""
    env = dict(os.environ if env is None else env)
    stages = resolve_stages(path, root, overrides)
    rendezvous = Rendezvous.from_env(env)
    relay = SignalRelay()
    results: list[StageResult] = []
    for stage in stages:
        run_dir, steps = stage.cfg.run_dir, stage.cfg.train.steps
        step = checkpoint_step(run_dir)
        cmd = stage_command(rendezvous, stage)
        if dry_run:
            if stage.nnodes != rendezvous.nnodes:  # show the command each node would run
                cmd = stage_command(Rendezvous.placeholder(stage.nnodes), stage)
            from mugv.training.plan import describe

            status = (
                "complete"
                if step is not None and step >= steps
                else (f"in progress at step {step}" if step is not None else "new")
            )
            summary = describe(stage.cfg, stage.world_size).split("\n---\n", 1)[-1]  # without the YAML dump
            plan = f"stage {stage.name} ({status}, {run_dir}):\n  {' '.join(cmd)}\n{summary}"
            results.append(StageResult(stage.name, run_dir, "planned", step, steps, command=cmd, plan=plan))
            continue
        if step is not None and step >= steps:
            log.info(f"stage {stage.name}: complete at step {step} in {run_dir}; skipped")
            results.append(StageResult(stage.name, run_dir, "skipped", step, steps))
            continue
        rendezvous.check(stage.nnodes, f"stage {stage.name!r}")
        init = stage.cfg.train.init_from
        if step is None and init and not os.path.exists(init):
            raise ConfigError(f"stage {stage.name!r}: init checkpoint {init} does not exist")
        what = (
            f"resuming at step {step}"
            if step is not None
            else f"from {stage.cfg.train.init_from or 'scratch'}"
        )
        stage_env = launch_env(env, stage.nproc)
        if rendezvous.endpoint:  # the run lock's job id, the same on every node
            stage_env.setdefault("MUGV_JOB_ID", f"{rendezvous.endpoint}/{stage.name}")
        check_free(run_dir, stage_env.get("MUGV_JOB_ID", ""))
        log.info(f"stage {stage.name}: {stage.world_size} processes, {what} -> {run_dir}")
        rc = relay.run(cmd, stage_env)
        step = checkpoint_step(run_dir)
        if rc == 0 and rendezvous.endpoint and (step is None or step < steps) and not relay.received:
            step = _wait_for_step(run_dir, steps)
        done = rc == 0 and step is not None and step >= steps
        status = "completed" if done else ("failed" if rc != 0 else "interrupted")
        results.append(StageResult(stage.name, run_dir, status, step, steps, rc, cmd))
        log.info(f"stage {stage.name}: {status} (exit code {rc}, checkpoint step {step} of {steps})")
        if not done or relay.received:
            break
    return results


def _wait_for_step(run_dir: str, steps: int) -> int | None:
    """Multi-node: another node's rank 0 may have published the final checkpoint on a shared file
    system whose metadata this node sees late."""
    deadline = time.monotonic() + _FS_SETTLE_S
    step = checkpoint_step(run_dir)
    while (step is None or step < steps) and time.monotonic() < deadline:
        time.sleep(1.0)
        step = checkpoint_step(run_dir)
    return step

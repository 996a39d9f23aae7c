"""The one typed config of a training run (a curriculum stage), loaded from YAML + overrides:

    cfg = load_config(TrainConfig, "configs/stages/...yaml", ["optim.lr=1e-4"])
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from mugv.data.config import DataConfig
from mugv.diffusion import SamplerConfig
from mugv.models import MUGDiTConfig
from mugv.models.megatron.weight_map import LORA_TARGETS


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass
class ModelConfig:
    """A preset, optionally with some architecture fields overridden."""

    preset: str = "mugdit_tiny"  # mugdit_tiny, mugdit_1b, _4b, _10b or _18b (mugv.models.PRESETS)
    hidden_size: int | None = None  # override the preset's hidden size C (None: the preset's)
    depth: int | None = None  # override the number of transformer blocks
    num_heads: int | None = None  # override the number of attention heads
    caption_channels: int | None = None  # override the text-feature width (the T5's d_model)

    def build(self) -> MUGDiTConfig:
        cfg = MUGDiTConfig.from_preset(self.preset).to_dict()
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "preset" and value is not None:
                cfg[f.name] = value
        return MUGDiTConfig(**cfg)


@dataclass
class ParallelConfig:
    """The parallel layout and precision; DP is what is left of the world size."""

    tp: int = 1  # tensor-parallel size
    pp: int = 1  # pipeline-parallel size (stages)
    vpp: int | None = None  # virtual pipeline chunks per stage (interleaved 1F1B)
    cp: int = 1  # context-parallel size (the token sequence split over ranks)
    sequence_parallel: bool = True  # with tp > 1
    cp_attention: str = "a2a"  # "a2a" (Ulysses) or "allgather" (KV all-gather)
    backend: str = "local"  # "local" or "te" (Transformer Engine, GPU)
    te_attention: bool = False  # backend te: Transformer Engine's DotProductAttention as the self-attention core
    distributed_optimizer: bool = True  # shard optimizer state (and fp32 main params) over DP
    overlap_grad_reduce: bool = False  # overlap the DP gradient reduce with the backward pass
    overlap_param_gather: bool = False  # distributed optimizer: overlap the param all-gather with the forward
    bucket_size: int | None = None  # DDP gradient bucket size in elements (None: Megatron's default)
    bf16: bool = False  # bf16 params/compute with fp32 main params in the optimizer
    # None; "selective": recompute LayerNorm + modulation, QK-norm + RoPE, GELU (no matmul);
    # "full": recompute whole layers (the first recompute_layers of each pipeline chunk; 0 = all),
    # the others selective. Bytes and FLOPs per mode: README "Memory and recompute".
    recompute: str | None = None
    recompute_layers: int = 0  # "full" only: layers recomputed whole per pipeline chunk (0 = all)
    fp8: str | None = None  # Transformer Engine FP8 ("hybrid" or "e4m3"), backend "te" only

    def validate(self) -> None:
        for name in ("tp", "pp", "cp"):
            _check(getattr(self, name) >= 1, f"parallel.{name} = {getattr(self, name)} must be >= 1")
        _check(self.cp_attention in ("a2a", "allgather"),
               f"parallel.cp_attention must be 'a2a' or 'allgather', got {self.cp_attention!r}")  # fmt: skip
        _check(self.backend in ("local", "te"), f"parallel.backend must be 'local' or 'te', got {self.backend!r}")
        _check(self.recompute in (None, "full", "selective"),
               f"parallel.recompute must be null, 'full' or 'selective', got {self.recompute!r}")  # fmt: skip
        _check(self.recompute_layers >= 0 and (not self.recompute_layers or self.recompute == "full"),
               f"parallel.recompute_layers = {self.recompute_layers} needs recompute: full and >= 0")  # fmt: skip
        _check(not self.te_attention or self.backend == "te", "parallel.te_attention needs parallel.backend=te")
        _check(self.fp8 in (None, "hybrid", "e4m3"), f"parallel.fp8 must be null, 'hybrid' or 'e4m3', got {self.fp8!r}")
        _check(not self.fp8 or self.backend == "te", "parallel.fp8 needs parallel.backend=te")
        _check(self.vpp is None or self.pp >= 2, "parallel.vpp needs parallel.pp >= 2")
        _check(self.vpp is None or self.vpp >= 1, f"parallel.vpp = {self.vpp} must be >= 1 (or null)")
        _check(self.bucket_size is None or self.bucket_size > 0, f"parallel.bucket_size = {self.bucket_size} must be > 0")
        _check(not self.overlap_param_gather or (self.distributed_optimizer and self.overlap_grad_reduce),
               "parallel.overlap_param_gather needs parallel.distributed_optimizer and parallel.overlap_grad_reduce")  # fmt: skip

    def check_model(self, dit: MUGDiTConfig) -> None:
        """The layout fits the architecture (as Megatron-Core will check it, but before any start)."""
        _check(dit.num_heads % self.tp == 0, f"parallel.tp = {self.tp} must divide the {dit.num_heads} attention heads")
        if self.cp > 1 and self.cp_attention == "a2a":
            _check((dit.num_heads // self.tp) % self.cp == 0,
                   f"parallel.cp = {self.cp} must divide the {dit.num_heads // self.tp} heads per TP rank with "
                   "cp_attention=a2a (Ulysses); use parallel.cp_attention=allgather")  # fmt: skip
        chunks = self.pp * (self.vpp or 1)
        _check(dit.depth % chunks == 0,
               f"model depth {dit.depth} is not divisible by parallel.pp x parallel.vpp = {chunks} pipeline chunks")  # fmt: skip


@dataclass
class OptimConfig:
    """Optimizer (Megatron-Core Adam) and learning-rate schedule."""

    optimizer: str = "adamw"  # "adam" / "adamw"
    lr: float = 1e-4  # peak learning rate
    min_lr: float = 0.0  # floor the cosine / wsd decay ends at
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # Adam (beta1, beta2)
    eps: float = 1e-8  # Adam epsilon
    weight_decay: float = 0.0  # decoupled weight decay (adamw)
    clip_grad: float = 1.0  # 0 disables
    schedule: str = "constant"  # "constant", "cosine" or "wsd" (warmup-stable-decay)
    warmup_steps: int = 0  # linear warm-up from 0 over this many steps
    decay_steps: int = 0  # wsd: length of the final decay; cosine: 0 = until train.steps

    def validate(self) -> None:
        _check(self.optimizer in ("adam", "adamw"), f"optim.optimizer must be 'adam' or 'adamw', got {self.optimizer!r}")
        _check(self.schedule in ("constant", "cosine", "wsd"),
               f"optim.schedule must be constant/cosine/wsd, got {self.schedule!r}")  # fmt: skip
        _check(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
               f"optim.betas = {list(self.betas)} must be two values in [0, 1)")  # fmt: skip
        _check(self.lr >= 0, f"optim.lr = {self.lr} must be >= 0")
        _check(self.eps > 0, f"optim.eps = {self.eps} must be > 0")
        for name in ("weight_decay", "clip_grad"):
            _check(getattr(self, name) >= 0, f"optim.{name} = {getattr(self, name)} must be >= 0")


@dataclass
class TrainSection:
    """Steps, batches, seeds and the stage hand-over."""

    steps: int = 100  # optimizer steps of this run (stage)
    # "flow" (rectified flow) or "flow_dpo" (Flow-DPO on a pairs dataset against a frozen reference: dpo.*)
    objective: str = "flow"
    microbatches: int = 1  # micro-batches per DP rank per step (gradient accumulation)
    seed: int = 1234  # model init, noise and text dropout
    text_dropout: float = 0.1  # per-sample probability of the null text (classifier-free guidance)
    # timestep shift: 0 = SPEC's resolution/duration ratio from each sample's own size; > 0 = this
    # fixed ratio (e.g. 1 = no shift: below 512 px the size-based ratio is < 1 and rarely trains
    # at high noise, which is where tiny experiments learn layout). Sample with the same value.
    shift_ratio: float = 0.0
    max_nonfinite_in_row: int = 5  # stop after this many consecutive non-finite steps
    time_budget_minutes: float = 0.0  # save and exit cleanly after this wall time (0 = none)
    # restart every process this many times when one fails (torchrun's restarts: each resumes from
    # the latest complete checkpoint); a divergence or too much bad data is not restarted
    max_restarts: int = 0
    # resuming at another data-parallel size: change train.microbatches so that DP x microbatches
    # stays what the checkpoint had (where that divides); false: keep train.microbatches (a warning says
    # how the global batch changed)
    keep_global_batch: bool = True
    init_from: str = ""  # checkpoint to start from when the run has none (stage hand-over)
    init_load_optimizer: bool = False  # with init_from: also take its optimizer state
    init_use_ema: bool = False  # start from the EMA weights of init_from


@dataclass
class LoRAConfig:
    """LoRA fine-tuning: adapters on the layer linears, the base weights (from train.init_from) frozen."""

    rank: int = 0  # adapter rank r; 0 = off (full-parameter training)
    alpha: float = 32.0  # the adapter output is scaled by alpha / rank
    dropout: float = 0.0  # dropout on the adapter input (its RNG is not checkpointed; not with recompute: full)
    # linears to adapt: qkv, proj (self-attention), cross_q, cross_kv, cross_proj, fc1, fc2 (MLP)
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))

    def validate(self) -> None:
        _check(self.rank >= 0, f"lora.rank = {self.rank} must be >= 0 (0 = off)")
        if not self.rank:
            return
        _check(self.alpha > 0, f"lora.alpha = {self.alpha} must be > 0")
        _check(0.0 <= self.dropout < 1.0, f"lora.dropout = {self.dropout} is not in [0, 1)")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        _check(bool(self.targets) and not unknown and len(set(self.targets)) == len(self.targets),
               f"lora.targets = {list(self.targets)} must be distinct names of {list(LORA_TARGETS)}")  # fmt: skip


@dataclass
class DPOConfig:
    """Flow-DPO (train.objective=flow_dpo; mugv.training.dpo)."""

    # inverse temperature of the preference loss -log sigmoid(-beta/2 (d(chosen) - d(rejected))), in
    # units of the per-sample flow loss (a mean over latent elements)
    beta: float = 500.0


@dataclass
class CheckpointConfig:
    """Checkpoint cadence and retention (Megatron dist_checkpointing, layout-independent)."""

    interval: int = 1000  # steps; 0 = only at the end / on signals
    # complete checkpoints kept (older ones are deleted), plus the newest one whose loss was seen to be
    # normal (the newest is not known to be healthy when it is saved: a divergence may not prune it)
    keep_last: int = 3
    async_save: bool = False  # write shards in a background process while training continues


@dataclass
class WatchdogConfig:
    """Hang detection (a hung job fails with every rank's stack and the slow rank named) and orphans.

    See mugv.parallel.watchdog."""

    step_factor: float = 10.0  # a step slower than this x the median of recent steps is a hang (0 = off)
    min_step_s: float = 300.0  # ... but never one shorter than this
    first_step_s: float = 1800.0  # limit of the first 3 steps (compilation, warm-up)
    save_s: float = 3600.0  # limit of what runs between steps (a checkpoint save, a preview)
    orphan_grace_s: float = 120.0  # the launcher died: time to save and stop before processes are killed

    def validate(self) -> None:
        _check(self.step_factor == 0 or self.step_factor > 1,
               f"watchdog.step_factor = {self.step_factor} must be > 1 (or 0 = off)")  # fmt: skip
        for name in ("min_step_s", "first_step_s", "save_s", "orphan_grace_s"):
            _check(getattr(self, name) > 0, f"watchdog.{name} = {getattr(self, name)} must be > 0")


@dataclass
class EMAConfig:
    """Exponential moving average of the weights (fp32)."""

    decay: float = 0.9999  # 0 disables


@dataclass
class LoggingConfig:
    """Console, TensorBoard and Weights & Biases metrics (rank 0)."""

    interval: int = 10  # steps between metric lines
    tensorboard: bool = True  # write run_dir/tb event files
    wandb_project: str = ""  # Weights & Biases project ("" = off)
    wandb_run: str = ""  # Weights & Biases run name ("" = the run dir's name)
    peak_tflops: float = 0.0  # per device; 0 = look the GPU up in mugv.models.flops


@dataclass
class PreviewConfig:
    """Sample previews during training (0 = off)."""

    interval: int = 0  # steps between previews (0 = off)
    prompts: list[str] = field(default_factory=list)  # one preview clip per prompt
    latent_shape: list[int] = field(default_factory=lambda: [1, 4, 4])  # T, H, W in latent units
    sampler: SamplerConfig = field(default_factory=SamplerConfig)  # steps, guidance and shift of the previews
    autoencoder: str = ""  # path of the VAE / demo autoencoder to decode previews; "" = save latents
    text_encoder: str = ""  # local T5 directory for the prompts


@dataclass
class TrainConfig:
    """One training run (a curriculum stage)."""

    run_dir: str = "runs/default"  # checkpoints, TensorBoard, previews and the resolved config go here
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainSection = field(default_factory=TrainSection)
    data: DataConfig = field(default_factory=DataConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    preview: PreviewConfig = field(default_factory=PreviewConfig)
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)

    def validate(self) -> None:
        """Every required field and cross-field rule, at load (before any process starts)."""
        from mugv.training.schedule import LRSchedule

        _check(bool(self.run_dir), "run_dir is empty")
        dit = self.model.build()
        self.parallel.validate()
        self.parallel.check_model(dit)
        self.optim.validate()
        _check(bool(self.data.paths), "data.paths is empty: give the latent dataset directories / release CSVs "
               "(e.g. data.paths=[data/ds])")  # fmt: skip
        self.data.validate()
        t = self.train
        _check(t.steps >= 1, f"train.steps = {t.steps} must be >= 1")
        _check(t.objective in ("flow", "flow_dpo"), f"train.objective must be 'flow' or 'flow_dpo', got {t.objective!r}")
        _check(self.dpo.beta > 0, f"dpo.beta = {self.dpo.beta} must be > 0")
        _check(t.microbatches >= 1, f"train.microbatches = {t.microbatches} must be >= 1")
        if self.parallel.vpp:
            _check(t.microbatches % self.parallel.pp == 0,
                   f"train.microbatches ({t.microbatches}) must be a multiple of parallel.pp "
                   f"({self.parallel.pp}) with virtual pipeline stages (interleaved schedule)")  # fmt: skip
        _check(0.0 <= t.text_dropout < 1.0, f"train.text_dropout = {t.text_dropout} is not in [0, 1)")
        _check(t.shift_ratio >= 0, f"train.shift_ratio = {t.shift_ratio} must be >= 0 (0 = size-based)")
        _check(t.max_nonfinite_in_row >= 1, f"train.max_nonfinite_in_row = {t.max_nonfinite_in_row} must be >= 1")
        _check(t.time_budget_minutes >= 0, f"train.time_budget_minutes = {t.time_budget_minutes} must be >= 0")
        _check(t.max_restarts >= 0, f"train.max_restarts = {t.max_restarts} must be >= 0")
        self.watchdog.validate()
        _check(bool(t.init_from) or not (t.init_load_optimizer or t.init_use_ema),
               "train.init_load_optimizer / train.init_use_ema need train.init_from")  # fmt: skip
        self.lora.validate()
        if self.lora.rank:
            _check(bool(t.init_from), "lora.rank > 0 trains adapters on frozen base weights: set train.init_from "
                   "(the checkpoint, e.g. a `mugv convert from-hf` output, they are read from)")  # fmt: skip
            _check(not (self.lora.dropout and self.parallel.recompute == "full"),
                   "lora.dropout > 0 with parallel.recompute=full: the recompute would draw other dropout masks")  # fmt: skip
        LRSchedule(self.optim, t.steps)  # the schedule's own rules (cosine after warmup, wsd fits)
        _check(self.checkpoint.interval >= 0, f"checkpoint.interval = {self.checkpoint.interval} must be >= 0")
        _check(self.checkpoint.keep_last >= 1, f"checkpoint.keep_last = {self.checkpoint.keep_last} must be >= 1")
        _check(0.0 <= self.ema.decay < 1.0, f"ema.decay = {self.ema.decay} is not in [0, 1)")
        _check(self.logging.interval >= 1, f"logging.interval = {self.logging.interval} must be >= 1")
        _check(self.logging.peak_tflops >= 0, f"logging.peak_tflops = {self.logging.peak_tflops} must be >= 0")
        p = self.preview
        _check(p.interval >= 0, f"preview.interval = {p.interval} must be >= 0")
        if p.interval > 0:
            _check(bool(p.prompts), "preview.interval is set but preview.prompts is empty")
            _check(bool(p.text_encoder), "preview.prompts need preview.text_encoder (a local T5 directory)")
        _check(len(p.latent_shape) == 3 and all(v >= 1 for v in p.latent_shape),
               f"preview.latent_shape = {list(p.latent_shape)} must be three positive sizes (T, H, W)")  # fmt: skip

"""The one typed config of a training run (a curriculum stage), loaded from YAML + overrides:

    cfg = load_config(TrainConfig, "configs/stages/...yaml", ["optim.lr=1e-4"])
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from mugv.data.config import DataConfig
from mugv.diffusion import SamplerConfig
from mugv.models import MUGDiTConfig


@dataclass
class ModelConfig:
    """A preset, optionally with some architecture fields overridden."""

    preset: str = "mugdit_tiny"
    hidden_size: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    caption_channels: int | None = None

    def build(self) -> MUGDiTConfig:
        cfg = MUGDiTConfig.from_preset(self.preset).to_dict()
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "preset" and value is not None:
                cfg[f.name] = value
        return MUGDiTConfig(**cfg)


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    vpp: int | None = None  # virtual pipeline chunks per stage (interleaved 1F1B)
    cp: int = 1
    sequence_parallel: bool = True  # with tp > 1
    cp_attention: str = "a2a"  # "a2a" (Ulysses) or "allgather" (KV all-gather)
    backend: str = "local"  # "local" or "te" (Transformer Engine, GPU)
    te_attention: bool = False  # backend te: Transformer Engine's DotProductAttention as the self-attention core
    distributed_optimizer: bool = True
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    bucket_size: int | None = None  # DDP gradient bucket size in elements (None: Megatron's default)
    bf16: bool = False  # bf16 params/compute with fp32 main params in the optimizer
    # None; "selective": recompute LayerNorm + modulation, QK-norm + RoPE, GELU (no matmul);
    # "full": recompute whole layers (the first recompute_layers of each pipeline chunk; 0 = all),
    # the others selective. Bytes and FLOPs per mode: README "Memory and recompute".
    recompute: str | None = None
    recompute_layers: int = 0
    fp8: str | None = None  # Transformer Engine FP8 ("hybrid" or "e4m3"), backend "te" only

    def validate(self) -> None:
        for name in ("tp", "pp", "cp"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name} must be >= 1")
        if self.recompute not in (None, "full", "selective"):
            raise ValueError(f"parallel.recompute must be null, 'full' or 'selective', got {self.recompute!r}")
        if self.recompute_layers < 0 or (self.recompute_layers and self.recompute != "full"):
            raise ValueError(f"parallel.recompute_layers = {self.recompute_layers} needs recompute: full and >= 0")
        if self.te_attention and self.backend != "te":
            raise ValueError("parallel.te_attention needs parallel.backend=te")
        if self.fp8 not in (None, "hybrid", "e4m3"):
            raise ValueError(f"parallel.fp8 must be null, 'hybrid' or 'e4m3', got {self.fp8!r}")
        if self.fp8 and self.backend != "te":
            raise ValueError("parallel.fp8 needs parallel.backend=te")
        if self.vpp is not None and self.pp < 2:
            raise ValueError("parallel.vpp needs parallel.pp >= 2")


@dataclass
class OptimConfig:
    optimizer: str = "adamw"  # "adam" / "adamw"
    lr: float = 1e-4
    min_lr: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip_grad: float = 1.0  # 0 disables
    schedule: str = "constant"  # "constant", "cosine" or "wsd" (warmup-stable-decay)
    warmup_steps: int = 0
    decay_steps: int = 0  # wsd: length of the final decay; cosine: 0 = until train.steps

    def validate(self) -> None:
        if self.optimizer not in ("adam", "adamw"):
            raise ValueError(f"optim.optimizer must be 'adam' or 'adamw', got {self.optimizer!r}")
        if self.schedule not in ("constant", "cosine", "wsd"):
            raise ValueError(f"optim.schedule must be constant/cosine/wsd, got {self.schedule!r}")
        if len(self.betas) != 2:
            raise ValueError("optim.betas needs two values")


@dataclass
class TrainSection:
    steps: int = 100
    microbatches: int = 1  # micro-batches per DP rank per step (gradient accumulation)
    seed: int = 1234
    text_dropout: float = 0.1  # per-sample probability of the null text (classifier-free guidance)
    # timestep shift: 0 = SPEC's resolution/duration ratio from each sample's own size; > 0 = this
    # fixed ratio (e.g. 1 = no shift: below 512 px the size-based ratio is < 1 and rarely trains
    # at high noise, which is where tiny experiments learn layout). Sample with the same value.
    shift_ratio: float = 0.0
    max_nonfinite_in_row: int = 5  # stop after this many consecutive non-finite steps
    time_budget_minutes: float = 0.0  # save and exit cleanly after this wall time (0 = none)
    init_from: str = ""  # checkpoint to start from when the run has none (stage hand-over)
    init_load_optimizer: bool = False
    init_use_ema: bool = False  # start from the EMA weights of init_from


@dataclass
class CheckpointConfig:
    interval: int = 1000  # steps; 0 = only at the end / on signals
    keep_last: int = 3
    async_save: bool = False  # write shards in a background process while training continues


@dataclass
class EMAConfig:
    decay: float = 0.9999  # 0 disables


@dataclass
class LoggingConfig:
    interval: int = 10
    tensorboard: bool = True
    wandb_project: str = ""
    wandb_run: str = ""
    peak_tflops: float = 0.0  # per device; 0 = look the GPU up in mugv.models.flops


@dataclass
class PreviewConfig:
    """Sample previews during training (0 = off)."""

    interval: int = 0
    prompts: list[str] = field(default_factory=list)
    latent_shape: list[int] = field(default_factory=lambda: [1, 4, 4])  # T, H, W in latent units
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    autoencoder: str = ""  # path of the VAE / demo autoencoder to decode previews; "" = save latents
    text_encoder: str = ""  # local T5 directory for the prompts


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainSection = field(default_factory=TrainSection)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    preview: PreviewConfig = field(default_factory=PreviewConfig)

    def validate(self) -> None:
        self.model.build()
        self.parallel.validate()
        self.optim.validate()
        self.data.validate()
        if self.train.steps < 0 or self.train.microbatches < 1:
            raise ValueError("train.steps must be >= 0 and train.microbatches >= 1")
        if self.parallel.vpp and self.train.microbatches % self.parallel.pp:
            raise ValueError(
                f"train.microbatches ({self.train.microbatches}) must be a multiple of parallel.pp "
                f"({self.parallel.pp}) with virtual pipeline stages (interleaved schedule)"
            )
        if not 0.0 <= self.train.text_dropout < 1.0:
            raise ValueError(f"train.text_dropout = {self.train.text_dropout} is not in [0, 1)")
        if not 0.0 <= self.ema.decay < 1.0:
            raise ValueError(f"ema.decay = {self.ema.decay} is not in [0, 1)")

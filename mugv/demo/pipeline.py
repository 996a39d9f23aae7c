"""`run_demo`: the whole framework end to end on a CPU in minutes.

    1. data      synthetic clips + images -> PCA autoencoder + tiny T5 -> run_prep -> dataset
    2. train     the demo curriculum (configs/curriculum/demo.yaml: an image stage at TP=2, then a
                 video stage at PP=2 started from it), with the demo's sizes as overrides
    3. export    the last stage's EMA weights -> HF directory (`mugv convert to-hf`)
    4. sample    prompts like the training captions -> mp4s (`mugv sample`, CFG)
    5. report    the loss per logged step of both stages -> loss.csv (+ loss.png)

Everything goes under one output directory; nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field

from mugv.demo.data import DemoDataConfig, build_demo_data
from mugv.demo.plot import read_loss_curves, write_loss_csv, write_loss_png
from mugv.utils.logging import get_logger

log = get_logger("demo")

REPO_CURRICULUM = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "configs",
    "curriculum",
    "demo.yaml",
)
SHIFT_RATIO = 1.0
PROMPTS = (
    "a red circle moving left to right on a black background",
    "a blue square moving top to bottom on a black background",
)


@dataclass
class DemoPlan:
    """The sizes of a demo run (the full run by default; `fast()` for tests)."""

    data: DemoDataConfig = field(default_factory=DemoDataConfig)
    image_steps: int = 480
    video_steps: int = 420
    # model.* overrides: the preset's 72 channels are fewer than a token's 96 latent values
    model: tuple[str, ...] = ("model.hidden_size=192", "model.depth=4", "model.num_heads=4")
    log_interval: int = 10
    sample_steps: int = 25
    guidance: float = 4.0
    prompts: tuple[str, ...] = PROMPTS

    @classmethod
    def fast(cls) -> DemoPlan:
        return cls(
            data=DemoDataConfig(num_videos=12, num_images=24),
            image_steps=6,
            video_steps=6,
            model=(),
            log_interval=2,
            sample_steps=4,
            prompts=PROMPTS[:1],
        )


@dataclass
class DemoResult:
    out: str
    dataset: str
    autoencoder: str
    psnr_video: float
    curriculum: str
    run_dirs: list[str]
    tensorboard: list[str]
    loss_csv: str
    loss_png: str | None
    first_loss: float
    last_loss: float
    hf_dir: str
    videos: list[str]
    seconds: dict[str, float]

    def format(self) -> str:
        lines = [
            f"demo finished in {sum(self.seconds.values()):.0f} s ("
            + ", ".join(f"{k} {v:.0f} s" for k, v in self.seconds.items())
            + ")",
            f"  dataset        {self.dataset}",
            f"  autoencoder    {self.autoencoder} (PCA, round-trip PSNR {self.psnr_video:.1f} dB on the clips)",
            f"  training loss  {self.first_loss:.3f} (first logged) -> {self.last_loss:.3f} (last logged)",
            f"  loss curve     {self.loss_png or '(no PNG)'}  {self.loss_csv}",
            f"  TensorBoard    tensorboard --logdir {os.path.dirname(self.run_dirs[0])}",
            f"  HF export      {self.hf_dir}",
        ]
        lines += [f"  sample video   {v}" for v in self.videos]
        return "\n".join(lines)


def derive_curriculum(src: str, dst: str, plan: DemoPlan, nproc: int) -> str:
    """The demo curriculum file with the demo's step counts (and, for nproc 1, single-process
    layouts) as stage overrides, written to `dst`."""
    from mugv.config.loader import save_config
    from mugv.training.curriculum import load_curriculum

    cur = load_curriculum(src)  # stage config paths are now absolute
    if len(cur.stages) != 2:
        raise ValueError(f"{src}: the demo expects 2 stages (images, video), found {len(cur.stages)}")
    for stage, steps in zip(cur.stages, (plan.image_steps, plan.video_steps), strict=True):
        stage.overrides = [*stage.overrides, f"train.steps={steps}"]
        if nproc != stage.nproc:
            if nproc != 1:
                raise ValueError(f"--nproc {nproc}: the demo runs its stages on 2 processes or on 1")
            stage.nproc = 1
            stage.overrides += ["parallel.tp=1", "parallel.pp=1", "parallel.cp=1"]
    save_config(cur, dst)
    return dst


def train_overrides(plan: DemoPlan, dataset: str) -> list[str]:
    return [
        f"data.paths=[{os.path.abspath(dataset)}]",
        f"data.text_len={plan.data.text_length}",
        f"logging.interval={plan.log_interval}",
        "logging.tensorboard=true",
        "checkpoint.interval=0",
        "checkpoint.keep_last=1",
        # 64 px is far below the 512 px the size-based shift is tuned for: train (and sample) unshifted
        f"train.shift_ratio={SHIFT_RATIO}",
        *plan.model,
    ]


def run_demo(
    out: str = "runs/demo",
    nproc: int = 2,
    plan: DemoPlan | None = None,
    overwrite: bool = False,
    curriculum: str = REPO_CURRICULUM,
) -> DemoResult:
    from mugv.cli.main import main as mugv_main
    from mugv.training.curriculum import run_curriculum

    plan = plan or DemoPlan()
    if os.path.exists(out) and os.listdir(out):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty (pass --overwrite to replace it)")
        shutil.rmtree(out)
    if not os.path.isfile(curriculum):
        raise FileNotFoundError(f"demo curriculum not found: {curriculum} (run from a source checkout)")
    os.makedirs(out, exist_ok=True)
    seconds: dict[str, float] = {}

    t0 = time.monotonic()
    log.info(f"demo 1/4: synthetic data -> {out}/data")
    data = build_demo_data(os.path.join(out, "data"), plan.data)
    seconds["data"] = time.monotonic() - t0

    t0 = time.monotonic()
    cur = derive_curriculum(curriculum, os.path.join(out, "curriculum.yaml"), plan, nproc)
    log.info(f"demo 2/4: training curriculum {cur}")
    results = run_curriculum(cur, os.path.join(out, "runs"), train_overrides(plan, data.dataset))
    bad = [r for r in results if r.status not in ("completed", "skipped")]
    if bad or len(results) != 2:
        raise RuntimeError(f"demo training stopped: {[(r.name, r.status, r.returncode) for r in results]}")
    seconds["train"] = time.monotonic() - t0

    t0 = time.monotonic()
    hf = os.path.join(out, "hf")
    log.info(f"demo 3/4: exporting the EMA weights of {results[-1].run_dir} -> {hf}")
    _cli(mugv_main, ["convert", "to-hf", "--ckpt", results[-1].run_dir, "--ema", "--out", hf])
    seconds["export"] = time.monotonic() - t0

    t0 = time.monotonic()
    videos = []
    for i, prompt in enumerate(plan.prompts):
        path = os.path.join(out, "samples", f"sample_{i}.mp4")
        log.info(f"demo 4/4: sampling {prompt!r} -> {path}")
        # fmt: off
        _cli(mugv_main, [
            "sample", "--model", hf, "--t5", data.t5, "--text-length", str(plan.data.text_length),
            "--vae", data.autoencoder, "--prompt", prompt, "--frames", str(plan.data.frames),
            "--height", str(plan.data.size), "--width", str(plan.data.size), "--fps", str(plan.data.fps),
            "--steps", str(plan.sample_steps), "--guidance", str(plan.guidance), "--seed", str(i),
            "--shift-ratio", str(SHIFT_RATIO),
            "--device", "cpu", "--out", path,
        ])
        # fmt: on
        videos.append(path)
    seconds["sample"] = time.monotonic() - t0

    run_dirs = [r.run_dir for r in results]
    curves = read_loss_curves(run_dirs)
    loss_csv = write_loss_csv(os.path.join(out, "loss.csv"), curves)
    loss_png = write_loss_png(os.path.join(out, "loss.png"), curves)
    losses = [v for _, points in curves for _, v in points]
    return DemoResult(
        out=out,
        dataset=data.dataset,
        autoencoder=data.autoencoder,
        psnr_video=data.psnr_video,
        curriculum=cur,
        run_dirs=run_dirs,
        tensorboard=[os.path.join(d, "tb") for d in run_dirs],
        loss_csv=loss_csv,
        loss_png=loss_png,
        first_loss=losses[0] if losses else float("nan"),
        last_loss=losses[-1] if losses else float("nan"),
        hf_dir=hf,
        videos=videos,
        seconds=seconds,
    )


def _cli(main, argv: list[str]) -> None:
    rc = main(argv)
    if rc:
        raise RuntimeError(f"`mugv {' '.join(argv)}` exited with {rc}")

"""Side objects of the training loop: LR schedule, metrics logger, stop guards (CPU)."""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import time
import types

import pytest
import torch

from mugv.data.batch import LatentBatch
from mugv.models import MUGDiTConfig
from mugv.training.config import LoggingConfig, OptimConfig
from mugv.training.guards import NonFiniteGuard, StopSignals, TimeBudget, agree
from mugv.training.metrics import MetricsLogger, frame_grid
from mugv.training.schedule import LRSchedule
from tests.dist_harness import run_distributed

MODEL = MUGDiTConfig(hidden_size=72, depth=2, num_heads=2, caption_channels=32)


# ---------------------------------------------------------------- LR schedule


def _sched(total: int, **optim) -> LRSchedule:
    return LRSchedule(OptimConfig(**optim), total)


def test_constant_with_warmup():
    s = _sched(100, lr=1e-3, warmup_steps=4)
    assert [s.lr(i) for i in range(5)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])
    assert s.lr(99) == s.lr(500) == pytest.approx(1e-3)
    assert _sched(10, lr=2e-4).lr(0) == pytest.approx(2e-4)  # no warmup: first update at peak


def test_cosine_until_total_steps():
    s = _sched(10, schedule="cosine", lr=1.0, min_lr=0.1, warmup_steps=2)  # decays over 8 updates
    assert s.lr(0) == pytest.approx(0.5)
    assert s.lr(1) == pytest.approx(1.0)  # end of warmup = start of the cosine
    assert s.lr(3) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))  # p = 2/8
    assert s.lr(5) == pytest.approx(0.55)  # p = 1/2
    assert s.lr(9) == pytest.approx(0.1)  # last update at min_lr
    assert s.lr(50) == pytest.approx(0.1)


def test_cosine_with_decay_steps():
    s = _sched(100, schedule="cosine", lr=1.0, min_lr=0.1, warmup_steps=2, decay_steps=4)
    assert s.lr(3) == pytest.approx(0.55)  # n = 4: p = 2/4
    assert s.lr(5) == pytest.approx(0.1)  # n = 6 = warmup + decay
    assert s.lr(60) == pytest.approx(0.1)


def test_wsd():
    s = _sched(10, schedule="wsd", lr=1.0, min_lr=0.2, warmup_steps=2, decay_steps=4)
    got = [s.lr(i) for i in range(10)]
    assert got == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 0.8, 0.6, 0.4, 0.2])
    assert _sched(5, schedule="wsd", lr=1.0).lr(4) == pytest.approx(1.0)  # no decay steps: flat


@pytest.mark.parametrize(
    "total, optim, match",
    [
        (10, dict(schedule="wsd", warmup_steps=4, decay_steps=7), "exceed train.steps"),
        (4, dict(schedule="cosine", warmup_steps=4), "not after optim.warmup_steps"),
        (10, dict(lr=1e-4, min_lr=1e-3), "min_lr"),
        (10, dict(schedule="linear"), "optim.schedule"),
    ],
)
def test_schedule_rejects_bad_config(total, optim, match):
    with pytest.raises(ValueError, match=match):
        _sched(total, **optim)


def test_negative_step_rejected():
    with pytest.raises(ValueError, match="step must be >= 0"):
        _sched(10).lr(-1)


def test_apply_plain_and_megatron_optimizers():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    s = _sched(10, lr=1.0, warmup_steps=4)
    plain = torch.optim.SGD([{"params": a.parameters()}, {"params": b.parameters(), "lr": 7.0}], lr=3.0)
    assert s.apply(plain, 1) == pytest.approx(0.5)
    assert [g["lr"] for g in plain.param_groups] == [0.5, 0.5]

    from mugv.parallel.cpu_compat import install_cpu_shims, uninstall_cpu_shims

    install_cpu_shims()  # Megatron's optimizers allocate on "cuda"
    try:
        from megatron.core.optimizer import OptimizerConfig
        from megatron.core.optimizer.optimizer import ChainedOptimizer, FP32Optimizer

        inner = [
            torch.optim.AdamW(a.parameters(), lr=9.0),
            torch.optim.AdamW([{"params": [b.weight]}, {"params": [b.bias]}], lr=9.0),
        ]
        chained = ChainedOptimizer([FP32Optimizer(o, OptimizerConfig(lr=9.0), lambda o: None) for o in inner])
        s.apply(chained, 2)
    finally:
        uninstall_cpu_shims()
    assert [g["lr"] for o in inner for g in o.param_groups] == pytest.approx([0.75] * 3)
    with pytest.raises(TypeError, match="no param_groups"):
        s.apply(object(), 0)


def test_schedule_state_dict_records_changes():
    old = _sched(100, schedule="cosine", lr=1e-4, warmup_steps=10)
    same = _sched(100, schedule="cosine", lr=1e-4, warmup_steps=10)
    assert same.load_state_dict(old.state_dict()) == {}
    new_stage = _sched(50, schedule="wsd", lr=5e-5, decay_steps=10)
    changed = new_stage.load_state_dict(old.state_dict())
    assert changed == {"schedule": ("cosine", "wsd"), "lr": (1e-4, 5e-5), "warmup_steps": (10, 0),
                       "decay_steps": (0, 10), "total_steps": (100, 50)}  # fmt: skip
    assert new_stage.lr(49) == pytest.approx(0.0)  # the current config still rules
    with pytest.raises(ValueError, match="unknown keys"):
        new_stage.load_state_dict({"warmup": 3})


# ---------------------------------------------------------------- guards


def test_nonfinite_guard_counts_resets_and_stops():
    g = NonFiniteGuard(3)
    assert g.check(1, 0.5, 1.0, ["a"])
    assert not g.check(2, float("nan"), 1.0, ["b"])
    assert not g.check(3, 0.5, float("inf"), ["c"])  # grad norm alone is enough
    assert g.check(4, torch.tensor(0.4), torch.tensor(2.0), ["d"])  # resets the run
    assert (g.in_row, g.skipped_total) == (0, 2)
    assert g.check(5, None, 1.0, ["e"])  # no loss here (non-last pipeline stage)
    assert not g.check(10, torch.tensor(float("nan")), None, ["x1"])
    assert not g.check(11, float("nan"), None, ["x2"])
    with pytest.raises(RuntimeError, match=r"step 12: 3 consecutive") as err:
        g.check(12, float("inf"), float("nan"), ["bad-7", "bad-8"])
    assert "bad-7" in str(err.value) and "x1" in str(err.value) and "step 10" in str(err.value)
    assert g.state_dict() == {"skipped_total": 5}
    with pytest.raises(ValueError, match="max_nonfinite_in_row"):
        NonFiniteGuard(0)


def test_stop_signals_set_flag_and_uninstall():
    before = signal.getsignal(signal.SIGUSR1)
    s = StopSignals()
    try:
        assert not s.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        deadline = time.monotonic() + 2
        while not s.requested and time.monotonic() < deadline:
            time.sleep(0.001)
        assert s.requested and s.signal_name == "SIGUSR1"
    finally:
        s.uninstall()
    assert signal.getsignal(signal.SIGUSR1) == before
    with StopSignals(signals=(signal.SIGTERM,)) as t:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert t.signal_name == "SIGTERM"


def test_time_budget():
    now = [100.0]
    b = TimeBudget(0.5, clock=lambda: now[0])  # 30 s
    now[0] += 29.9
    assert not b.expired()
    now[0] += 0.1
    assert b.expired()
    real = TimeBudget(1e-4)  # 6 ms of real time
    time.sleep(0.02)
    assert real.expired()
    assert not TimeBudget(0.0).expired()  # 0 = no budget
    assert agree(True) and not agree(False)  # no process group: the flag itself


def _agree_worker(rank: int, world_size: int):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    got = agree(rank == 1)
    nobody = agree(False)
    guard = NonFiniteGuard(2)  # only rank 1 sees a NaN loss: both ranks must skip
    ok = guard.check(7, float("nan") if rank == 1 else 0.3, 1.0, [f"id{rank}"])
    return got, nobody, ok, guard.skipped_total


def test_agree_over_two_gloo_ranks():
    assert run_distributed(_agree_worker, 2, timeout=60) == [(True, False, False, 1)] * 2


# ---------------------------------------------------------------- metrics


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def log_lines():
    handler = _Records()
    logger = logging.getLogger("mugv")
    level = logger.level
    logger.setLevel(logging.INFO)  # as the CLI configures it (the tests also pass alone)
    logger.addHandler(handler)
    yield handler.lines
    logger.removeHandler(handler)
    logger.setLevel(level)


def _fake_flops(config, t, h, w, text_len, training):
    assert config is MODEL and training is True
    return 1e12 * text_len


def _logger(tmp_path, clock, **kw) -> MetricsLogger:
    cfg = LoggingConfig(**{"interval": 2, "tensorboard": False, **kw.pop("cfg", {})})
    args = dict(rank=0, model_config=MODEL, world_size=2, total_steps=10)
    return MetricsLogger(cfg, tmp_path, **{**args, **kw}, flops_fn=_fake_flops, clock=clock)


def test_metrics_line_and_values_with_fake_clock(tmp_path, log_lines):
    now = [50.0]
    calls = []

    def twice(t):  # two DP replicas that saw the same data
        calls.append(t.clone())
        return t * 2

    m = _logger(tmp_path, lambda: now[0], cfg={"peak_tflops": 10.0, "tensorboard": True},
                reduce_fn=twice, buckets=["1x4x6", "2x4x6"])  # fmt: skip
    m.record_samples(torch.tensor([1.0, 3.0]), ["t2v", "t2v"], "2x4x6", (2, 4, 6), [3, 5])
    m.record_step(lr=1e-4, grad_norm=1.0, data_wait_s=0.5)
    assert m.maybe_log(1) is None and not calls
    m.record_samples(torch.tensor([5.0]), ["t2i"], "1x4x6", (1, 4, 6), [4])
    m.record_step(lr=2e-4, grad_norm=3.0, data_wait_s=0.5)
    now[0] += 4.0
    v = m.maybe_log(2)
    assert len(calls) == 1
    assert v["perf/samples_per_s"] == pytest.approx(6 / 4)  # 3 samples x 2 replicas in 4 s
    assert v["perf/tokens_per_s"] == pytest.approx(2 * (2 * 14 + 8) / 4)  # 2*2*3+2 and 1*2*3+2 tokens
    assert v["perf/tflops_per_device"] == pytest.approx(2 * 12e12 / 4 / 2 / 1e12)  # 3 TFLOP/s
    assert v["perf/mfu"] == pytest.approx(0.3)
    assert v["loss/all"] == pytest.approx(3.0) and v["loss/t2v"] == pytest.approx(2.0)
    assert v["loss/t2i"] == pytest.approx(5.0) and "loss/i2v" not in v
    assert v["loss/bucket/2x4x6"] == pytest.approx(2.0) and v["loss/bucket/1x4x6"] == pytest.approx(5.0)
    assert v["optim/grad_norm"] == pytest.approx(2.0) and v["optim/lr"] == pytest.approx(2e-4)
    assert v["perf/step_s"] == pytest.approx(2.0) and v["progress/eta_s"] == pytest.approx(16.0)
    assert v["perf/max_memory_gib"] > 0.01  # RSS of this process
    line = log_lines[-1]
    for part in ("step 2/10", "loss 3.0000 (t2i 5.0000 t2v 2.0000)", "lr 2.000e-04", "grad norm 2.000",
                 "1.50 samples/s", "18 tokens/s", "3.00 TFLOP/s/device", "MFU 30.0%",
                 "data wait 0.500 s/step", "ETA 0m16s"):  # fmt: skip
        assert part in line, (part, line)

    # the window restarts: only the new step counts
    m.record_samples(torch.tensor([float("nan"), 1.5]), ["i2v", "i2v"], "2x4x6", (2, 4, 6), [1, 1])
    m.record_step(lr=3e-4, grad_norm=float("nan"), skipped=True)
    now[0] += 1.0
    assert m.maybe_log(3) is None
    v = m.maybe_log(4)
    assert v["loss/all"] == pytest.approx(1.5)  # the NaN sample is left out
    assert v["perf/samples_per_s"] == pytest.approx(4.0) and "optim/grad_norm" not in v
    assert v["optim/skipped_steps"] == 1 and m.state_dict()["samples"] == 10
    m.close()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert len(files) == 1
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("perf/samples_per_s")] == [(2, 1.5), (4, 4.0)]
    assert events.Scalars("loss/t2i")[0].value == pytest.approx(5.0)


def test_metrics_cpu_without_peak_and_other_ranks(tmp_path, log_lines):
    now = [0.0]
    m = _logger(tmp_path, lambda: now[0], world_size=1)
    m.record_samples(None, ["t2i"], "1x2x2", (1, 2, 2), [0])  # no loss known on this stage
    m.record_step(lr=1e-4, grad_norm=None)
    now[0] += 2.0
    v = m.maybe_log(2)
    assert "perf/mfu" not in v and "loss/all" not in v
    assert "MFU n/a" in log_lines[-1] and "loss n/a" in log_lines[-1]
    assert m.maybe_log(10) is not None  # the last step always logs

    calls = []
    other = _logger(tmp_path, lambda: now[0], rank=1, reduce_fn=lambda t: calls.append(1) or t)
    other.record_samples(torch.tensor([1.0]), ["t2v"], "1x2x2", (1, 2, 2), [2])
    n = len(log_lines)
    assert other.maybe_log(2) is None and calls == [1] and len(log_lines) == n  # reduces, stays quiet
    with pytest.raises(ValueError, match="unknown tasks"):
        other.record_samples(torch.tensor([1.0]), ["v2v"], "1x2x2", (1, 2, 2), [2])


def test_objective_values_are_reduced_means(tmp_path, log_lines):
    """Flow-DPO's per-pair values: summed with their counts over DP (here a replica that saw other
    pairs), logged as means, also on the console; a stage that records none still reduces; the
    FLOPs carry the objective's factor (the reference forward)."""
    keys = ("dpo/reward_accuracy", "dpo/reward_margin")
    def add_other(t):  # another replica saw 1 pair (accuracy 1, margin 2): 3 counters, 2 x 7 loss keys
        return t + torch.cat([torch.zeros(3 + 14), torch.tensor([1.0, 2.0, 1.0, 1.0])]).to(t)  # then sums, counts

    m = _logger(tmp_path, lambda: 0.0, reduce_fn=add_other, buckets=["1x4x6", "2x4x6", "3x4x6"],
                value_keys=keys, flops_factor=4 / 3)
    m.record_samples(torch.tensor([0.5, 0.5, 0.1, 0.1]), ["t2v"] * 4, "2x4x6", (2, 4, 6), [3, 3, 3, 3])
    m.record_values({"dpo/reward_accuracy": torch.tensor([1.0, 0.0]), "dpo/reward_margin": torch.tensor([1.0, -3.0])})
    m.record_step(lr=1e-4, grad_norm=1.0)
    v = m.log(2)
    assert v["dpo/reward_accuracy"] == pytest.approx(2 / 3) and v["dpo/reward_margin"] == pytest.approx(0.0)
    assert v["perf/model_tflop_per_step"] == pytest.approx(4 * 3 * 4 / 3 / 2)  # 4 samples x 3 TFLOP x 4/3 / 2 steps
    assert "reward accuracy 0.6667" in log_lines[-1] and "reward margin 0.0000" in log_lines[-1]
    with pytest.raises(ValueError, match="unknown value keys"):
        m.record_values({"dpo/typo": torch.tensor([1.0])})
    quiet = _logger(tmp_path, lambda: 0.0, rank=1, value_keys=keys, reduce_fn=lambda t: t)
    assert quiet.log(2) is None  # a non-last pipeline stage: zeros of the same length, no error


def test_record_batch_uses_real_text_lengths(tmp_path):
    seen = []

    def flops(config, t, h, w, text_len, training):
        seen.append((t, h, w, text_len))
        return 0.0

    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    batch = LatentBatch(
        latents=torch.zeros(2, 24, 3, 5, 6), y=torch.zeros(2, 1, 4, 32), mask=mask,
        x_mask=torch.ones(2, 3, dtype=torch.bool), fps=torch.full((2,), 24.0),
        frame_indices=torch.arange(5).repeat(2, 1), pixel_size=torch.tensor([[40, 48]] * 2),
        tasks=["t2v", "i2v"], bucket="3x5x6", ids=["a", "b"],
    )  # fmt: skip
    m = MetricsLogger(LoggingConfig(interval=1, tensorboard=False), tmp_path, 0, MODEL, 1, 5, flops_fn=flops)
    m.record_batch(batch, torch.tensor([0.2, 0.4]))
    assert seen == [(3, 5, 6, 3), (3, 5, 6, 1)]
    v = m.maybe_log(1)
    assert v["progress/tokens"] == 2 * (3 * 3 * 3 + 2)
    assert v["loss/bucket/3x5x6"] == pytest.approx(0.3) and v["loss/i2v"] == pytest.approx(0.4)


def test_frame_grid_layout():
    video = torch.arange(5, dtype=torch.uint8).view(5, 1, 1, 1).expand(5, 2, 3, 3)  # frame k is all k
    grid = frame_grid(video)
    assert grid.shape == (4, 9, 3)  # 2 rows x 3 cols of 2x3 frames
    assert grid[0, 0, 0] == 0 and grid[0, 3, 0] == 1 and grid[0, 6, 0] == 2
    assert grid[2, 0, 0] == 3 and grid[3, 5, 2] == 4 and grid[2, 6, 0] == 0  # padding


class _FakeWandb(types.ModuleType):
    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logged, self.finished = [], [], 0
        self.Video = lambda data, fps: ("video", data.shape, fps)
        self.Image = lambda data: ("image", data.shape)

    def init(self, **kw):
        self.inits.append(kw)
        fake = self

        class Run:
            id = kw["id"] or "run123"

            def log(self, values, step):
                fake.logged.append((step, values))

            def finish(self):
                fake.finished += 1

        return Run()


def test_wandb_and_video_preview(tmp_path, monkeypatch):
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    have_moviepy = "moviepy" in sys.modules or __import__("importlib").util.find_spec("moviepy") is not None
    cfg = {"wandb_project": "mugv-test", "wandb_run": "tiny", "tensorboard": True}
    m = _logger(tmp_path, lambda: 0.0, cfg=cfg)
    m.record_samples(torch.tensor([1.0]), ["t2i"], "1x2x2", (1, 2, 2), [1])
    m.maybe_log(2)
    video = torch.randint(0, 255, (5, 8, 6, 3), dtype=torch.uint8)
    m.log_video(2, "preview/0", video, fps=4)
    with pytest.raises(ValueError, match=r"uint8 \[T, H, W, 3\]"):
        m.log_video(2, "preview/0", video.float())
    m.close()
    assert fake.inits[0]["project"] == "mugv-test" and fake.inits[0]["name"] == "tiny"
    assert (tmp_path / "wandb_id").read_text() == "run123" and fake.finished == 1
    assert fake.logged[0][0] == 2 and fake.logged[0][1]["loss/t2i"] == 1.0
    expected = ("video", (5, 3, 8, 6), 4) if have_moviepy else ("image", (16, 18, 3))
    assert fake.logged[1] == (2, {"preview/0": expected})
    MetricsLogger(LoggingConfig(**cfg), tmp_path, 0, MODEL, 1, 10, flops_fn=_fake_flops).close()
    assert fake.inits[1]["id"] == "run123"  # a restart continues the run

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    if not have_moviepy:
        image = events.Images("preview/0")[0]
        assert (image.step, image.width, image.height) == (2, 18, 16)


def test_real_flops_and_gpu_peak_lookup(tmp_path, monkeypatch):
    from mugv.models.flops import mugdit_flops_per_sample

    now = [0.0]
    cfg = LoggingConfig(interval=1, tensorboard=False, peak_tflops=0.5)
    m = MetricsLogger(cfg, tmp_path, 0, MODEL, 1, 3, clock=lambda: now[0])  # default flops function
    m.record_samples(torch.tensor([1.0, 1.0]), ["t2v", "t2v"], "3x5x6", (3, 5, 6), [7, 2])
    now[0] += 0.5
    v = m.maybe_log(1)
    expected = sum(mugdit_flops_per_sample(MODEL, 3, 5, 6, n, training=True) for n in (7, 2))
    assert v["perf/tflops_per_device"] == pytest.approx(expected / 0.5 / 1e12)
    assert v["perf/mfu"] == pytest.approx(expected / 0.5 / 0.5e12)

    # on a GPU without logging.peak_tflops the device table gives the peak
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    gpu = MetricsLogger(
        LoggingConfig(tensorboard=False), tmp_path, 0, MODEL, 1, 3, device=torch.device("cuda", 0)
    )
    assert gpu.peak_tflops == pytest.approx(989.0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Mystery GPU")
    gpu = MetricsLogger(
        LoggingConfig(tensorboard=False), tmp_path, 0, MODEL, 1, 3, device=torch.device("cuda", 0)
    )
    assert gpu.peak_tflops is None

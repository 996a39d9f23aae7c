"""The curriculum runner: a two-stage tiny curriculum end to end on CPU (TP2 -> PP2 hand-over,
skip on rerun), the multi-node launch command, and the pre-emption signal relay."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from mugv.config import ConfigError
from mugv.parallel.launch import Rendezvous, SignalRelay
from mugv.training.curriculum import resolve_stages, run_curriculum, stage_command
from mugv.utils.checkpoint_io import write_json_atomic
from tests.trainer_utils import dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = os.path.join(REPO, "configs", "stages")


def write_curriculum(tmp_path, stage2_overrides) -> str:
    path = tmp_path / "cur.yaml"
    path.write_text(
        textwrap.dedent(f"""\
        root: {tmp_path / "unused"}
        overrides: [train.steps=3, checkpoint.interval=0, logging.interval=1]
        stages:
          - name: one
            config: {STAGES}/demo_images.yaml
            nproc: 2
            init: none
          - name: two
            config: {STAGES}/demo_video.yaml
            nproc: 2
            overrides: {stage2_overrides}
            init: previous
        """)
    )
    return str(path)


def test_two_stages_hand_over_weights_across_layouts_and_skip_when_done(tmp_path, capfd):
    from mugv.checkpoint.weights import load_release_weights

    data = dataset(str(tmp_path))  # synthetic images + 2-frame clips, 32 text channels
    # stage 2 at lr 0 keeps the weights it starts from: its final checkpoint shows its initial weights
    cur = write_curriculum(tmp_path, "[optim.lr=0, optim.min_lr=0, optim.decay_steps=1]")
    root, ovr = str(tmp_path / "runs"), [f"data.paths=[{data}]", "model.caption_channels=32"]
    t0 = time.perf_counter()
    results = run_curriculum(cur, root, ovr)
    elapsed = time.perf_counter() - t0
    assert [(r.name, r.status, r.step) for r in results] == [("one", "completed", 3), ("two", "completed", 3)]
    out = capfd.readouterr().out
    assert "world 2 = tp 2 x pp 1" in out and "world 2 = tp 1 x pp 2" in out
    assert f"initialised from {os.path.join(root, 'one', 'checkpoints', 'step_00000003')}" in out

    _, first = load_release_weights(os.path.join(root, "one"))
    _, second = load_release_weights(os.path.join(root, "two"))
    assert set(first) == set(second)
    for k, v in first.items():
        assert torch.equal(second[k], v), k

    again = run_curriculum(cur, root, ovr)  # both complete: nothing is launched
    assert [(r.status, r.returncode) for r in again] == [("skipped", None), ("skipped", None)]
    print(f"two-stage curriculum: {elapsed:.1f} s")


def lora_dpo_curriculum(path, root: str, base: str, data: str, pairs: str, stages: int) -> str:
    """LoRA SFT on `base` -> full-parameter Flow-DPO with `init: previous` (its first `stages`)."""
    entries = [f"""\
  - name: sft
    config: {STAGES}/demo_images.yaml
    nproc: 2
    init: {base}
    overrides: [lora.rank=4, lora.alpha=8, "data.paths=[{data}]", optim.lr=2e-2]
""", f"""\
  - name: dpo
    config: {STAGES}/demo_images.yaml
    nproc: 2
    init: previous
    use_ema: true
    overrides: [train.objective=flow_dpo, dpo.beta=100, ema.decay=0, train.text_dropout=0, "data.paths=[{pairs}]",
                optim.lr=0, optim.min_lr=0]
"""]
    path.write_text(f"root: {root}\noverrides: [train.steps=2, optim.warmup_steps=1, checkpoint.interval=0, logging.interval=1, "
                    f"model.caption_channels=32]\nstages:\n" + "".join(entries[:stages]))
    return str(path)


def test_lora_sft_then_dpo_from_its_merged_weights_in_a_moved_root(tmp_path, capfd):
    """A LoRA SFT stage, the tree of runs (its base inside) moved, then a full-parameter Flow-DPO
    stage with `init: previous`: it starts from the SFT stage's merged weights (at lr 0 its final
    checkpoint holds them), the base found through lora.json's relative path."""
    from mugv.checkpoint.weights import load_release_weights
    from mugv.data.synthetic import write_synthetic_pairs
    from tests.trainer_utils import base_checkpoint

    first, moved = tmp_path / "first", tmp_path / "moved"
    first.mkdir()
    data, base = dataset(str(tmp_path)), base_checkpoint(str(first))  # the base lives in the tree of runs
    pairs = str(tmp_path / "pairs")
    write_synthetic_pairs(pairs, {(1, 4, 4): 8}, text_dim=32, text_len=8)
    results = run_curriculum(lora_dpo_curriculum(tmp_path / "one.yaml", "unused", base, data, pairs, 1), str(first))
    assert [(r.name, r.status) for r in results] == [("sft", "completed")]
    os.rename(first, moved)  # the SFT run's lora.json names its base at its old absolute path
    cur = lora_dpo_curriculum(tmp_path / "two.yaml", "unused", base, data, pairs, 2)
    results = run_curriculum(cur, str(moved))
    assert [(r.name, r.status, r.step) for r in results] == [("sft", "skipped", 2), ("dpo", "completed", 2)]
    assert f"initialised from {os.path.join(str(moved), 'sft', 'checkpoints', 'step_00000002')}" in capfd.readouterr().out
    _, sft = load_release_weights(str(moved / "sft"), ema=True)  # the merged export of the SFT adapters' EMA
    _, dpo = load_release_weights(str(moved / "dpo"))
    _, plain = load_release_weights(str(moved / "base_ckpt"))
    assert set(sft) == set(dpo)
    for k, v in sft.items():
        assert float((dpo[k] - v).abs().max()) <= 1e-6 * float(v.abs().max()), k
    assert not torch.equal(sft["blocks.1.mlp.fc2.weight"], plain["blocks.1.mlp.fc2.weight"])


def test_stage_with_a_checkpoint_short_of_its_steps_is_resumed_not_skipped(tmp_path):
    cur = write_curriculum(tmp_path, "[optim.decay_steps=1]")  # wsd: warmup + decay fit 3 steps
    stages = resolve_stages(cur, str(tmp_path / "runs"), ["data.paths=[x]"])
    ckpts = os.path.join(stages[0].cfg.run_dir, "checkpoints")
    os.makedirs(os.path.join(ckpts, "step_00000003"))
    write_json_atomic(os.path.join(ckpts, "step_00000003", "complete.json"), {"step": 3})
    with open(os.path.join(ckpts, "latest"), "w") as f:
        f.write("step_00000003")
    plan = run_curriculum(cur, str(tmp_path / "runs"), ["data.paths=[x]"], dry_run=True)
    assert "(complete," in plan[0].plan and "(new," in plan[1].plan
    plan = run_curriculum(cur, str(tmp_path / "runs"), ["data.paths=[x]", "train.steps=5"], dry_run=True)
    assert "(in progress at step 3," in plan[0].plan
    assert f"train.init_from={os.path.join(str(tmp_path / 'runs'), 'one')}" in plan[1].command


def test_multi_node_launch_uses_the_environment_rendezvous(tmp_path):
    cur = write_curriculum(tmp_path, "[optim.decay_steps=1]")  # wsd: warmup + decay fit 3 steps
    stage = resolve_stages(cur, str(tmp_path), ["data.paths=[x]"])[0]
    rendezvous = Rendezvous.from_env(
        {"NNODES": "1", "NODE_RANK": "0", "MASTER_ADDR": "n0", "MASTER_PORT": "29501"}
    )
    cmd = stage_command(rendezvous, stage)
    i = cmd.index("mugv.parallel.agent")  # torchrun under the agent (signals: save and stop)
    assert cmd[i + 1] == "--orphan-grace=120"
    assert cmd[i + 2 : i + 8] == [
        "--nnodes=1",
        "--node-rank=0",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=n0:29501",
        "--rdzv-id=one",
        "--nproc-per-node=2",
    ]
    rendezvous.check(stage.nnodes, stage.name)
    with pytest.raises(ConfigError, match="nnodes=1, but this job has NNODES=4"):
        Rendezvous.from_env({"NNODES": "4", "NODE_RANK": "0", "MASTER_ADDR": "n0", "MASTER_PORT": "1"}).check(
            stage.nnodes, stage.name
        )
    with pytest.raises(ConfigError, match="MASTER_ADDR"):
        Rendezvous.from_env({"NNODES": "2", "NODE_RANK": "1", "MASTER_PORT": "1"})


WORKER = """
import os, signal, sys, time
signal.signal(signal.SIGUSR1, lambda s, f: (open(sys.argv[1] + ".got", "w").write("usr1"), sys.exit(0)))
signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGUSR1])  # (the agent starts workers with it blocked)
open(sys.argv[1] + ".ready", "w").write(str(os.getppid()))
time.sleep(60)
sys.exit(5)
"""


def test_signal_relay_reaches_the_workers_through_the_agent(tmp_path):
    """SIGUSR1 to the launcher goes to the agent, which relays it to the worker (not torchrun's
    kill): the worker exits cleanly, and so do the agent and the launcher."""
    script, flag = tmp_path / "worker.py", str(tmp_path / "flag")
    script.write_text(WORKER)

    def send_when_ready():
        deadline = time.monotonic() + 120
        while not os.path.exists(flag + ".ready") and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGUSR1)

    threading.Thread(target=send_when_ready, daemon=True).start()
    relay = SignalRelay()
    before = signal.getsignal(signal.SIGUSR1)
    cmd = [sys.executable, "-m", "mugv.parallel.agent", "--standalone", "--nproc-per-node=1", str(script), flag]
    rc = relay.run(cmd, dict(os.environ))
    assert rc == 0  # the worker saw SIGUSR1 and exited cleanly
    assert open(flag + ".got").read() == "usr1"
    assert relay.received == signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) is before


def test_single_node_script_dry_run(tmp_path):
    script = os.path.join(REPO, "scripts", "train_single_node.sh")
    out = subprocess.run(
        [
            script,
            os.path.join(REPO, "configs/curriculum/mugv_10b.yaml"),
            "--dry-run",
            "--root",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    stages = resolve_stages(os.path.join(REPO, "configs/curriculum/mugv_10b.yaml"), str(tmp_path))
    assert out.stdout.count("memory estimate per device") == len(stages) >= 6  # a..e, f_sft (LoRA)
    assert "--nnodes=8 --node-rank=$NODE_RANK --rdzv-backend=c10d" in out.stdout
    stage = subprocess.run(
        [script, os.path.join(STAGES, "demo_images.yaml"), "--nproc", "2", "--dry-run", "optim.lr=5e-4",
         "data.paths=[x]"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert stage.returncode == 0, stage.stderr[-2000:]
    assert "lr: 0.0005" in stage.stdout and "tp=2 pp=1 cp=1 dp=1" in stage.stdout

"""Exporting a LoRA run: `to-hf --merge-lora` loads strictly into the plain MUGDiT and gives the
adapter model's output; `--lora-only` is a PEFT adapter (peft reads it) that `mugv sample --lora`
applies to the base, sampling what the merged export samples (the merged weights give the
adapter model's output, which differs from the base's: the first test)."""

import pytest
import torch

from mugv.checkpoint import resolve
from mugv.checkpoint.lora import read_lora_record
from mugv.checkpoint.weights import dist_session, load_release_weights, read_adapters
from mugv.cli.main import main as cli
from mugv.convert import to_hf
from mugv.models import MUGDiT
from mugv.models.lora import add_lora, load_adapter
from tests.conftest import mixed_batch
from tests.dist_harness import run_distributed
from tests.trainer_utils import base_checkpoint, dataset, lora_overrides, overrides


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def train_and_probe_worker(rank, world, ovr, batch):
    """Train a LoRA run, then the live (Megatron, TP-sharded) adapter model's output on `batch`."""
    from mugv.config import load_config
    from mugv.training.config import TrainConfig
    from mugv.training.trainer import Trainer

    trainer = Trainer(load_config(TrainConfig, None, ovr))
    trainer.run()
    trainer.model[0].eval()
    with torch.no_grad():
        return trainer.model[0](**batch)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_export")
    data, base = dataset(str(root)), base_checkpoint(str(root))
    run = str(root / "run")
    config, base_sd = load_release_weights(base)
    batch = mixed_batch(config, B=2, T=2, H=4, W=6, L=5)
    ovr = overrides(run, data, 3, *lora_overrides(base), "optim.lr=2e-2", "parallel.tp=2")
    live = run_distributed(train_and_probe_worker, 2, ovr, batch, timeout=300)[0]
    ckpt = resolve(run)
    record = read_lora_record(ckpt)
    with dist_session():
        adapters = read_adapters(ckpt, config, record)
    # the adapter model in one process: the base with the exported adapters on, unmerged
    model = add_lora(MUGDiT.from_state_dict(config, base_sd), record["rank"], record["alpha"], record["targets"])
    model.load_state_dict({**base_sd, **adapters}, strict=True)
    return dict(root=root, base=base, run=run, config=config, base_sd=base_sd, model=model.eval(), batch=batch,
                live=live)


def test_merged_export_loads_strictly_and_matches_the_adapter_model(lora_run, tmp_path):
    dit = str(tmp_path / "merged.pt")
    with pytest.raises(ValueError, match="--merge-lora"):
        to_hf(lora_run["run"], release=dit)
    to_hf(lora_run["run"], release=dit, merge_lora=True)
    merged = MUGDiT.from_release(dit, lora_run["config"]).eval()  # strict: exactly the release keys
    plain = MUGDiT.from_state_dict(lora_run["config"], lora_run["base_sd"]).eval()
    with torch.no_grad():
        got, base, unmerged = (m(**lora_run["batch"]) for m in (merged, plain, lora_run["model"]))
    want = lora_run["live"]  # the trained Megatron adapter model (TP2) itself
    print(f"merged export vs live TP2 adapter model: rel {rel(got, want):.1e}; unmerged plain LoRA model: "
          f"{rel(unmerged, want):.1e}; base (no adapters): {rel(base, want):.1e}")
    assert rel(got, want) <= 1e-5 and rel(unmerged, want) <= 1e-5, (rel(got, want), rel(unmerged, want))
    assert rel(base, want) > 1e-3  # the adapters change the output: the comparison can fail


def test_lora_only_export_is_peft_and_round_trips_through_sample_lora(lora_run, tmp_path):
    from peft import PeftModel

    from mugv.text import make_tiny_t5
    from mugv.vae import VideoVAE, VideoVAEConfig
    from tests.test_sample_cli import SMALL_VAE

    adapter, merged_hf, base_hf = (str(tmp_path / n) for n in ("adapter", "merged_hf", "base_hf"))
    to_hf(lora_run["run"], out=adapter, lora_only=True)
    config, tensors = load_adapter(adapter)
    assert config.rank == 4 and len(tensors) == 2 * 7 * 2
    assert tensors["blocks.0.attn.qkv.lora_B.weight"].shape == (3 * 72, 4)
    # peft's own loader builds the same adapter model
    peft_model = PeftModel.from_pretrained(MUGDiT.from_state_dict(lora_run["config"], lora_run["base_sd"]), adapter)
    with torch.no_grad():
        assert rel(peft_model.eval()(**lora_run["batch"]), lora_run["model"](**lora_run["batch"])) <= 1e-5
    # mugv sample: base + --lora adapter == the merged export == the LoRA training checkpoint itself
    to_hf(lora_run["run"], out=merged_hf, merge_lora=True)
    to_hf(lora_run["base"], out=base_hf)
    t5 = make_tiny_t5(tmp_path / "t5", d_model=32, num_heads=2)
    torch.manual_seed(0)
    vae = str(tmp_path / "vae.pt")
    torch.save(VideoVAE(VideoVAEConfig(**SMALL_VAE)).state_dict(), vae)
    (tmp_path / "vae.json").write_text(f'{{"kind": "video_vae", "weights": "vae.pt", "config": {dict(SMALL_VAE)}}}'
                                       .replace("'", '"'))
    videos = {}
    for name, model in [("lora", [base_hf, "--lora", adapter]), ("merged", [merged_hf]), ("ckpt", [lora_run["run"]])]:
        out = str(tmp_path / f"{name}.pt")
        args = ["sample", "--model", *model, "--t5", t5, "--text-length", "8", "--vae", str(tmp_path / "vae.json"),
                "--prompt", "a red ball", "--frames", "9", "--height", "16", "--width", "16", "--steps", "2",
                "--out", out]  # fmt: skip
        assert cli(args) == 0
        videos[name] = torch.load(out)
    assert torch.allclose(videos["lora"], videos["merged"], atol=1e-5)
    assert torch.allclose(videos["ckpt"], videos["merged"], atol=1e-5)

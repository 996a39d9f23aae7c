"""Starting from a LoRA checkpoint (mugv.checkpoint.merged): a full-parameter run (and a full-
parameter Flow-DPO run's frozen reference) starts at TP2 / PP2 from exactly the merged export
(W + alpha/r * B A) and trains; each rank reads its own share of the base and its own layers'
adapters only; a LoRA Flow-DPO run from a LoRA SFT checkpoint gets fresh adapters on the merged
SFT weights, so its adapters-off reference is the SFT model, with no parameter added."""

import json
import os

import pytest
import torch

from mugv.checkpoint import resolve
from mugv.data.synthetic import write_synthetic_pairs
from tests.dist_harness import run_distributed
from tests.trainer_utils import base_checkpoint, dataset, load_worker, lora_overrides, overrides, train_worker

LOG2 = 0.6931472


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    """A LoRA SFT run at TP2 (2 steps, EMA on) on a from-hf base, and a pairs dataset."""
    root = tmp_path_factory.mktemp("merged_init")
    data, base = dataset(str(root)), base_checkpoint(str(root))
    run = str(root / "sft")
    run_distributed(train_worker, 2, overrides(run, data, 2, *lora_overrides(base), "optim.lr=2e-2", "parallel.tp=2"),
                    timeout=300)
    pairs = str(root / "pairs")
    write_synthetic_pairs(pairs, {(1, 4, 4): 8}, text_dim=32, text_len=8)
    return dict(root=root, data=data, base=base, run=run, ckpt=resolve(run), pairs=pairs)


def start_worker(rank, world, ovr, base):
    """Start from train.init_from, the weights (and the reference's), one step; the checkpoint bytes
    read by the start and by a plain weights-only load of `base` (the LoRA checkpoint's base)."""
    from mugv.checkpoint.merged import load_weights
    from mugv.config import load_config
    from mugv.training.config import TrainConfig
    from mugv.training.trainer import Trainer
    from tests.megatron_parity import to_release
    from tests.trainer_utils import release_params
    from tools.bench_merged_init import bytes_read

    trainer = Trainer(load_config(TrainConfig, None, ovr))
    with bytes_read() as start_bytes:
        trainer.resume()
    start = release_params(trainer)
    ref = to_release(trainer.reference.chunks, "data", False, trainer.dit.num_heads) if trainer.reference else None
    trainer.run()
    with bytes_read() as plain_bytes:
        load_weights(base, trainer.model)
    return dict(start=start, ref=ref, bytes=start_bytes["bytes"], plain=plain_bytes["bytes"], history=trainer.history,
                step=trainer.step)


def merged(ckpt, ema):
    from mugv.checkpoint.weights import load_release_weights

    return load_release_weights(ckpt, ema=ema)[1]  # the merged export (convert to-hf --merge-lora)


def stored_bytes(ckpt, prefix):
    """Stored bytes of a checkpoint's `prefix` tensors (every saved item)."""
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(ckpt).read_metadata()
    return sum(info.length for index, info in meta.storage_data.items() if index.fqn.startswith(prefix))


@pytest.mark.parametrize("layout", ["tp2_dpo", "pp2_ema", "dp2_ema"])
def test_full_run_from_lora_checkpoint_starts_at_the_merged_weights(sft, tmp_path, layout):
    """TP2: full-parameter Flow-DPO (raw adapters), its policy and its frozen reference; PP2 and
    DP2: plain flow training (the adapters' EMA), and what each pipeline stage / DP replica reads."""
    ema, dpo = layout.endswith("ema"), "dpo" in layout
    extra = {"tp2": ["parallel.tp=2"], "pp2": ["parallel.pp=2", "train.microbatches=2"], "dp2": []}[layout[:3]]
    if dpo:
        extra += ["train.objective=flow_dpo", "dpo.beta=100", "ema.decay=0", "train.text_dropout=0"]
    ovr = overrides(str(tmp_path / "run"), sft["pairs"] if dpo else sft["data"], 1, f"train.init_from={sft['run']}",
                    f"train.init_use_ema={ema}", *extra)
    results = run_distributed(start_worker, 2, ovr, sft["base"], timeout=300)
    want, base = merged(sft["ckpt"], ema), merged(sft["base"], False)
    for what in ("start", "ref") if dpo else ("start",):
        got = {k: v for r in results for k, v in r[what].items()}  # PP: each stage holds its own layers
        assert got.keys() == want.keys()
        worst = max(rel(got[k], v) for k, v in want.items())
        print(f"{layout} {what}: max rel difference to the merged export {worst:.1e}")
        assert worst <= 1e-6, (what, worst)
    # the merge changes the adapted weights far beyond the tolerance: the comparison can fail
    assert rel(want["blocks.0.attn.qkv.weight"], base["blocks.0.attn.qkv.weight"]) > 1e-3
    assert all(r["step"] == 1 and all(torch.isfinite(torch.tensor(r["history"]))) for r in results)
    if dpo:  # policy == reference at the start: the first DPO loss is log 2
        assert abs(results[-1]["history"][0] - LOG2) < 1e-6
    print(f"{layout}: bytes read per rank: start {[r['bytes'] for r in results]}, "
          f"a plain load of the base {[r['plain'] for r in results]}")
    if not dpo:  # PP2: each stage reads its own share of the base as a plain start does, plus its own layer's
        # adapters; DP2: each replica about half of both, exchanged. Either way no adapter is read twice
        extra_bytes = [r["bytes"] - r["plain"] for r in results]
        assert sum(extra_bytes) == stored_bytes(sft["ckpt"], "ema."), extra_bytes
        if layout.startswith("pp2"):  # one half of all the adapters each (the two stages' layers)
            assert extra_bytes[0] == extra_bytes[1], extra_bytes
        else:  # DP2: about half each (whole saved chunks are assigned to the replicas)
            assert max(extra_bytes) <= 0.6 * sum(extra_bytes), extra_bytes
        assert all(r["plain"] < 0.75 * stored_bytes(sft["base"], "model.") for r in results)


def lora_dpo_worker(rank, world, ovr, batch):
    """A LoRA Flow-DPO run from a LoRA checkpoint: reference and policy outputs at the start, the
    parameter count with the reference, one step, the live policy's output after it."""
    from mugv.config import load_config
    from mugv.models.megatron.lora import adapter_parameters
    from mugv.training.config import TrainConfig
    from mugv.training.trainer import Trainer

    trainer = Trainer(load_config(TrainConfig, None, ovr))
    trainer.resume()
    chunk = trainer.model[0]
    count = lambda: sum(p.numel() for m in trainer.model for p in m.parameters())
    n = count()
    chunk.eval()
    with torch.no_grad():
        ref = trainer.reference.forward(chunk, batch, None)
        policy = chunk(**batch)
    chunk.train()
    adapters_zero = all(not m.any() for m in adapter_parameters(trainer.model)[1::2])  # every lora_B
    trainer.run()
    chunk.eval()
    with torch.no_grad():
        after = chunk(**batch)
    from tests.trainer_utils import release_params

    return dict(ref=ref, policy=policy, after=after, params=(n, count()), ref_bytes=trainer.reference.param_bytes,
                kind=trainer.reference.kind, adapters_zero=adapters_zero, history=trainer.history,
                weights=release_params(trainer))


def test_lora_dpo_from_lora_sft_checkpoint_references_the_sft_model(sft, tmp_path):
    from mugv.checkpoint.weights import load_release_weights
    from mugv.models import MUGDiT
    from tests.conftest import mixed_batch

    config, sft_sd = load_release_weights(sft["run"], ema=True)  # the SFT model: base + EMA adapters, merged
    _, base_sd = load_release_weights(sft["base"])
    batch = mixed_batch(config, B=2, T=2, H=4, W=6, L=5)
    with torch.no_grad():
        want, base_out = (MUGDiT.from_state_dict(config, sd).eval()(**batch) for sd in (sft_sd, base_sd))
    run = str(tmp_path / "dpo")
    ovr = overrides(run, sft["pairs"], 1, "lora.rank=4", "lora.alpha=4", f"train.init_from={sft['run']}",
                    "train.init_use_ema=true", "train.objective=flow_dpo", "dpo.beta=100", "ema.decay=0",
                    "train.text_dropout=0", "optim.lr=2e-2")
    (r,) = run_distributed(lora_dpo_worker, 1, ovr, batch, timeout=300)
    print(f"LoRA DPO reference vs merged SFT model: rel {rel(r['ref'], want):.1e} (base alone: {rel(base_out, want):.1e})")
    assert r["kind"] == "adapters off" and r["ref_bytes"] == 0 and r["params"][0] == r["params"][1]
    assert rel(r["ref"], want) <= 1e-5 and rel(base_out, want) > 1e-3  # the SFT adapters are in the reference
    assert r["adapters_zero"] and torch.equal(r["policy"], r["ref"])  # fresh adapters: policy == reference
    assert abs(r["history"][0] - LOG2) < 1e-6
    ckpt = resolve(run)
    with open(os.path.join(ckpt, "lora.json")) as f:
        record = json.load(f)
    assert record["base"] == sft["ckpt"] and record["base_ema"] and record["rank"] == 4
    # its merged export goes through the chain (SFT merged, then the DPO adapters): the live policy
    _, dpo_sd = load_release_weights(run)
    with torch.no_grad():
        exported = MUGDiT.from_state_dict(config, dpo_sd).eval()(**batch)
    assert rel(exported, r["after"]) <= 1e-5 and rel(r["after"], want) > 1e-4, (rel(exported, r["after"]),)
    # a resume loads the same base (SFT merged, through lora.json) and adapters
    (resumed,) = run_distributed(load_worker, 1, [*ovr, "train.steps=2"], timeout=300)
    assert resumed["start"] == 1 and resumed["loaded"].keys() == r["weights"].keys()
    assert all(torch.equal(resumed["loaded"][k], v) for k, v in r["weights"].items())


def test_a_corrupt_lora_checkpoint_is_named_before_its_adapters_are_merged(sft, tmp_path):
    """A start from a LoRA checkpoint verifies it as any load does: a damaged shard is named, not merged."""
    import shutil

    from tests.dist_harness import DistributedRankError
    from tests.test_recovery import flip_bytes

    bad = str(tmp_path / "sft_copy")
    shutil.copytree(sft["ckpt"], bad)
    flip_bytes(os.path.join(bad, "__0_0.distcp"))
    with pytest.raises(DistributedRankError, match=r"sft_copy/__0_0.distcp: checksum"):
        run_distributed(start_worker, 1, overrides(str(tmp_path / "run"), sft["data"], 1, f"train.init_from={bad}"),
                        sft["base"], timeout=300)

"""Conversion: release dit.pt -> Megatron checkpoint (global keys) -> load at TP2 / PP2 -> HF / dit.pt,
and `mugv convert verify`."""

import os

import pytest
import torch

from mugv.checkpoint import resolve
from mugv.cli.main import main as cli
from mugv.convert import from_hf, to_hf, verify
from mugv.convert.sources import infer_config
from mugv.convert.verify import probe_batch
from mugv.models import MUGDiT
from mugv.utils.checkpoint_io import load_safetensors_dir
from tests.conftest import mixed_batch, tiny_model
from tests.dist_harness import run_distributed


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(reference model, dit.pt path, Megatron checkpoint dir) for a random tiny model."""
    root = tmp_path_factory.mktemp("convert")
    model = tiny_model(seed=3).eval()
    dit = str(root / "dit.pt")
    model.export_release(dit)
    ckpt = str(root / "ckpt")
    from_hf(dit, ckpt)
    return model, dit, ckpt


def test_checkpoint_layout(converted):
    model, _, ckpt = converted
    names = set(os.listdir(ckpt))
    assert {"metadata.json", "model_config.json", "complete.json", "common.pt"} <= names
    assert resolve(ckpt) == ckpt
    from megatron.core import dist_checkpointing

    meta = dist_checkpointing.load_tensors_metadata(ckpt)
    assert len(meta) == 2 * len(model.state_dict())
    C, D = model.config.hidden_size, model.config.head_dim
    assert tuple(meta["model.layers.1.self_attention.linear_qkv.weight"].global_shape) == (3 * C, C)
    assert tuple(meta["ema.layers.0.cross_attention.linear_kv.bias"].global_shape) == (2 * C,)
    assert tuple(meta["model.layers.0.self_attention.q_layernorm.weight"].global_shape) == (D,)


def test_round_trip_is_bit_identical(converted, tmp_path):
    model, dit, ckpt = converted
    want = torch.load(dit, weights_only=True)
    for ema in (False, True):
        hf, rel = str(tmp_path / f"hf{ema}"), str(tmp_path / f"dit{ema}.pt")
        # small read batches and shards: many dist_checkpointing loads, several safetensors files
        to_hf(ckpt, hf, release=rel, ema=ema, max_shard_bytes=200_000, batch_bytes=50_000)
        assert sum(f.endswith(".safetensors") for f in os.listdir(hf)) > 1
        got_pt, got_hf = torch.load(rel, weights_only=True), load_safetensors_dir(hf)
        assert list(got_pt) == list(want)  # the release key order
        assert set(got_hf) == set(want)
        for k, v in want.items():
            assert torch.equal(got_pt[k], v) and torch.equal(got_hf[k], v), k
    loaded = MUGDiT.from_pretrained(str(tmp_path / "hfTrue"))
    assert loaded.config == model.config


def test_bf16_keeps_dtype_and_run_dir_resolves_latest(tmp_path):
    model = tiny_model(seed=5).to(torch.bfloat16)
    dit = str(tmp_path / "dit.pt")
    model.export_release(dit)
    run = tmp_path / "run"
    from_hf(dit, str(run / "checkpoints" / "step_00000007"))
    (run / "checkpoints" / "latest").write_text("step_00000007\n")
    out = str(tmp_path / "back.pt")
    assert to_hf(str(run), release=out).endswith("step_00000007")
    back, want = torch.load(out, weights_only=True), model.state_dict()
    assert all(back[k].dtype == torch.bfloat16 and torch.equal(back[k], want[k]) for k in want)


def test_config_is_inferred_from_shapes(converted):
    model, _, _ = converted
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert infer_config(shapes, "x") == model.config


def _load_worker(rank, world, ckpt, tp, pp, batch):
    from mugv.convert import load_megatron_chunks, megatron_forward
    from mugv.parallel import init_distributed

    init_distributed(tp=tp, pp=pp)
    chunks, cfg = load_megatron_chunks(ckpt)
    return megatron_forward(chunks, cfg, batch)


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_megatron_loads_at_any_layout(converted, tp, pp):
    model, _, ckpt = converted
    batch = mixed_batch(model.config, B=2, T=2, H=4, W=5)
    with torch.no_grad():
        want = model(**batch)
    outs = [o for o in run_distributed(_load_worker, 2, ckpt, tp, pp, batch) if o is not None]
    assert len(outs) == (2 if pp == 1 else 1)
    for out in outs:
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_verify_passes_in_process_and_at_tp2(converted, tmp_path):
    model, dit, ckpt = converted
    hf = str(tmp_path / "hf")
    model.save_pretrained(hf)
    result = verify(hf, ckpt)
    assert result.ok and result.max_rel < 1e-5
    result = verify(dit, ckpt, tp=2, launcher=run_distributed)
    assert result.ok and result.max_rel < 1e-5
    result = verify(dit, ckpt, cp=2, launcher=run_distributed)  # `mugv convert verify --cp 2`
    assert result.ok and result.max_rel < 1e-5
    assert cli(["convert", "verify", "--hf", dit, "--ckpt", ckpt, "--ema"]) == 0


def test_verify_fails_on_a_corrupted_checkpoint(converted, tmp_path):
    model, dit, _ = converted
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["blocks.1.mlp.fc2.bias"] += 0.05
    bad_dit = str(tmp_path / "bad.pt")
    torch.save(sd, bad_dit)
    bad = str(tmp_path / "bad_ckpt")
    assert (
        cli(["convert", "from-hf", "--src", bad_dit, "--out", bad, "--config", _config_json(model, tmp_path)])
        == 0
    )
    result = verify(dit, bad)
    assert not result.ok and result.max_rel > result.tolerance
    assert cli(["convert", "verify", "--hf", dit, "--ckpt", bad]) == 1


def _config_json(model, tmp_path) -> str:
    import json

    path = tmp_path / "config.json"
    path.write_text(json.dumps(model.config.to_dict()))
    return str(path)


def test_bad_inputs_name_the_problem(converted, tmp_path):
    model, dit, ckpt = converted
    sd = model.state_dict()
    sd.pop("blocks.0.attn.proj.bias")
    broken = str(tmp_path / "broken.pt")
    torch.save(sd, broken)
    with pytest.raises(ValueError, match="blocks.0.attn.proj.bias"):
        from_hf(broken, str(tmp_path / "out"), model.config)
    with pytest.raises(FileExistsError, match="not empty"):
        from_hf(dit, ckpt)
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        to_hf(str(tmp_path), release=str(tmp_path / "x.pt"))
    with pytest.raises(ValueError, match="unknown MUGDiT preset"):
        cli(["convert", "from-hf", "--src", dit, "--out", str(tmp_path / "o2"), "--config", "nope"])


def test_probe_batch_is_fixed(converted):
    cfg = converted[0].config
    a, b = probe_batch(cfg, seed=1), probe_batch(cfg, seed=1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not bool(a["x_mask"].all()) and not bool(a["mask"].all())


def test_non_finite_weights_are_refused(converted, tmp_path):
    from mugv.checkpoint.weights import write_weights_checkpoint
    from mugv.sampling import load_model

    model, _, _ = converted
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["blocks.1.mlp.fc2.weight"][0, 0] = float("nan")
    nan_dit = str(tmp_path / "nan.pt")
    torch.save(sd, nan_dit)
    with pytest.raises(ValueError, match="blocks.1.mlp.fc2.weight has 1 non-finite"):
        from_hf(nan_dit, str(tmp_path / "out"), model.config)
    with pytest.raises(ValueError, match="blocks.1.mlp.fc2.weight has 1 non-finite"):
        load_model(nan_dit)
    ckpt = str(tmp_path / "nan_ckpt")  # a checkpoint holding NaN weights (as a diverged run leaves)
    write_weights_checkpoint(sd.__getitem__, model.config, ckpt, {})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.linear_fc2\.weight has 1 non-finite"):
        to_hf(ckpt, out=str(tmp_path / "hf"))
    with pytest.raises(ValueError, match="non-finite"):
        load_model(ckpt)
    assert cli(["checkpoint", "verify", ckpt]) == 0  # the files are as written: the values are the problem

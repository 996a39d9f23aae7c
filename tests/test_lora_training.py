"""LoRA fine-tuning through the real Trainer on gloo ranks: only adapters reach DDP, the
optimizer and the EMA; the base stays what train.init_from holds; checkpoints hold the adapters
and lora.json; resume is exact and a TP-changed resume loads the same adapters."""

import json
import os

import pytest
import torch

from mugv.models import MUGDiTConfig
from mugv.models.megatron.weight_map import LORA_TARGETS
from mugv.models.mugdit import PRESETS
from mugv.training.plan import lora_params_per_block
from tests.dist_harness import DistributedRankError, run_distributed
from tests.trainer_utils import (
    assert_resume_is_exact,
    base_checkpoint,
    dataset,
    load_worker,
    lora_overrides,
    overrides,
    train_worker,
)


def adapters_only_worker(rank, world, ovr):
    from mugv.checkpoint.state import optimizer_slices
    from mugv.config import load_config
    from mugv.models.megatron.lora import adapter_parameters
    from mugv.training.config import TrainConfig
    from mugv.training.trainer import Trainer
    from tests.trainer_utils import release_params

    trainer = Trainer(load_config(TrainConfig, None, ovr))
    trainer.resume()
    name = {id(p): n for m in trainer.model for n, p in m.named_parameters()}
    adapters = {name[id(p)] for p in adapter_parameters(trainer.model)}
    optimized = {name[id(s.model_param)] for s in optimizer_slices(trainer.optimizer)}  # this rank's shard
    in_ddp = {name[id(p)] for m in trainer.model for buf in m.buffers for p in buf.params}
    in_ema = {name[id(s.model_param)] for s in trainer.ema.slices}
    params = [p for m in trainer.model for p in m.parameters()]
    frozen_with_grad = [n for p in params if (n := name[id(p)]) not in adapters and (p.requires_grad or hasattr(p, "main_grad"))]
    before = release_params(trainer)
    data = iter(trainer.data)
    for _ in range(2):
        trainer.train_step([next(data)])
        trainer.step += 1
    after = release_params(trainer)
    state_bytes = sum(v.numel() * v.element_size() for s in optimizer_slices(trainer.optimizer) for v in s.state.values())
    return dict(adapters=adapters, optimized=optimized, ddp=in_ddp, ema=in_ema,
                frozen_with_grad=frozen_with_grad, state_bytes=state_bytes, before=before, after=after,
                n_params=len(params))


def test_optimizer_ddp_and_ema_hold_only_adapters(tmp_path):
    data, base = dataset(str(tmp_path)), base_checkpoint(str(tmp_path))
    ovr = overrides(str(tmp_path / "run"), data, 2, *lora_overrides(base))
    results = run_distributed(adapters_only_worker, 2, ovr, timeout=300)  # DP2, distributed optimizer
    from mugv.checkpoint.weights import load_release_weights

    _, base_sd = load_release_weights(base)
    adapters = results[0]["adapters"]
    assert len(adapters) == 2 * 7 * 2 and all(".lora_" in n for n in adapters)  # 2 layers x 7 targets x (A, B)
    # the distributed optimizer's (and EMA's) slices on each rank cover adapters only, all of them together
    assert set.union(*(r["optimized"] for r in results)) == adapters
    for r in results:
        assert r["n_params"] > len(adapters) and r["ddp"] == adapters and not r["frozen_with_grad"], r["frozen_with_grad"]
        assert r["optimized"] <= adapters and r["ema"] == r["optimized"]
        # distributed optimizer: each rank's fp32 main + Adam moments of half the adapters only
        adapter_numel = sum(v.numel() for k, v in r["after"].items() if ".lora_" in k)
        assert adapter_numel == 2 * lora_params_per_block(MUGDiTConfig(**{**PRESETS["mugdit_tiny"], "caption_channels": 32}),
                                                          list(LORA_TARGETS), 4)  # the dry-run's count
        assert r["state_bytes"] == pytest.approx(3 * 4 * adapter_numel / 2, rel=0.05), r["state_bytes"]
        for k, v in r["after"].items():
            if ".lora_" in k:
                assert not torch.equal(v, r["before"][k]), f"adapter {k} did not train"
            else:
                assert torch.equal(v, base_sd[k]) and torch.equal(v, r["before"][k]), f"base {k} changed"
    assert {k for k in results[0]["after"] if ".lora_" not in k} == set(base_sd)


def test_lora_resume_is_exact_and_checkpoint_holds_adapters(tmp_path):
    data, base = dataset(str(tmp_path)), base_checkpoint(str(tmp_path))
    resumed = assert_resume_is_exact(str(tmp_path), data, 4, *lora_overrides(base))
    ckpt = os.path.join(resumed, "checkpoints", "step_00000004")
    with open(os.path.join(ckpt, "lora.json")) as f:
        record = json.load(f)
    assert record["base"] == os.path.abspath(base) and record["rank"] == 4 and not record["base_ema"]
    from mugv.checkpoint.weights import checkpoint_metadata, dist_session

    with dist_session():
        keys = set(checkpoint_metadata(ckpt))
    assert keys and all(".lora_" in k for k in keys), sorted(k for k in keys if ".lora_" not in k)[:5]
    assert {k.split(".", 1)[0] for k in keys} == {"model", "optim", "ema"}


def test_lora_tp_changed_resume_and_missing_base(tmp_path):
    data, base = dataset(str(tmp_path)), base_checkpoint(str(tmp_path))
    run = str(tmp_path / "run")
    lo = lora_overrides(base)
    saved = run_distributed(train_worker, 2, overrides(run, data, 2, "parallel.tp=2", *lo), timeout=300)[0]["params"]
    # a LoRA run started from a LoRA checkpoint (stage hand-over): its base and adapters, the same lora.json base
    nxt = str(tmp_path / "next")
    (r,) = run_distributed(load_worker, 1, overrides(nxt, data, 1, *lora_overrides(run)), timeout=300)
    assert r["start"] == 0 and all(torch.equal(r["loaded"][k], v) for k, v in saved.items())
    with open(os.path.join(nxt, "checkpoints", "step_00000001", "lora.json")) as f:
        assert json.load(f)["base"] == os.path.abspath(base)
    (r,) = run_distributed(load_worker, 1, overrides(run, data, 3, *lo), timeout=300)
    assert r["start"] == 2 and r["step"] == 3 and set(r["loaded"]) == set(saved)
    for k, v in saved.items():
        assert torch.equal(r["loaded"][k], v), k
    os.rename(base, base + ".moved")  # the base named in lora.json is gone: a clear error
    with pytest.raises(DistributedRankError, match="frozen base weights come from"):
        run_distributed(load_worker, 1, overrides(run, data, 4, *lo), timeout=300)


def adapters_disabled_worker(rank, world, release_sd, dit_kwargs, batch):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from mugv.models import MUGDiTConfig
    from mugv.models.megatron import build_model_chunks, get_layer_spec, megatron_config
    from mugv.models.megatron.lora import LoRASettings, adapters_disabled, has_lora, prepare_lora
    from mugv.models.megatron.weight_map import release_to_chunk
    from mugv.parallel.runtime import init_distributed

    init_distributed()
    cfg = megatron_config(MUGDiTConfig(**dit_kwargs))
    plain = build_model_chunks(cfg)
    chunks = build_model_chunks(cfg, get_layer_spec("local", lora=LoRASettings(rank=4, alpha=8.0)))
    prepare_lora(chunks, seed=0)
    chunks[0].load_state_dict(release_to_chunk(release_sd, chunks[0], 0, 1, cfg.num_attention_heads), strict=True)
    model = [DistributedDataParallel(config=cfg, ddp_config=DistributedDataParallelConfig(), module=chunks[0])]
    count = lambda: sum(p.numel() for p in model[0].parameters())
    n = count()
    with torch.no_grad():
        lora_out = model[0](**batch)
        with adapters_disabled(model):
            base_out = model[0](**batch)
            n_inside = count()
        again = model[0](**batch)
    return dict(lora=lora_out, base=base_out, again=again, has=(has_lora(model), has_lora(plain), has_lora(model[0])),
                params=(n, n_inside))


def test_adapters_disabled_runs_the_base_network(tmp_path):
    """The DPO reference for LoRA: the same (DDP-wrapped) chunks with the adapters switched off give
    the base model's output, add no parameter, and switch back on after."""
    from tests.conftest import TINY, mixed_batch, tiny_model
    from tests.megatron_parity import lora_reference_model

    kwargs = dict(TINY, depth=2, num_heads=2)
    base = tiny_model(seed=0, **kwargs).eval()
    with torch.no_grad():
        base_sd = {k: v.clone() for k, v in base.state_dict().items()}
        batch = mixed_batch(base.config, B=2, T=2, H=4, W=4, L=5)
        want_base = base(**batch)
        lora = lora_reference_model(base, rank=4, alpha=8.0).eval()
        want_lora = lora(**batch)
    sd = {k: v.detach().clone() for k, v in lora.state_dict().items()}
    assert all(torch.equal(sd[k], v) for k, v in base_sd.items())
    (r,) = run_distributed(adapters_disabled_worker, 1, sd, kwargs, batch, timeout=120)
    rel = lambda a, b: float((a - b).abs().max() / b.abs().max())
    assert rel(r["base"], want_base) <= 1e-5 and rel(r["lora"], want_lora) <= 1e-5 and torch.equal(r["again"], r["lora"])
    assert rel(want_lora, want_base) > 1e-2
    assert r["has"] == (True, False, True) and r["params"][0] == r["params"][1]

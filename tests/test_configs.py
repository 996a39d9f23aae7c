"""Every YAML under configs/ loads and validates; the 10B stages fit 80 GB devices by the
plan's estimate (and their comments quote it); typos and broken cross-field rules fail at load
naming the key and the file; `base:` composition; `mugv config keys/show`; packaged configs."""

import dataclasses
import glob
import json
import os
import re
import subprocess
import sys
import time

import pytest

from mugv.cli.main import main
from mugv.config import ConfigError, find_config, load_config, packaged_config_dir, to_dict
from mugv.config.schema import describe_keys
from mugv.data.config import DataConfig
from mugv.models import MUGDiTConfig
from mugv.training.config import TrainConfig
from mugv.training.curriculum import load_curriculum, resolve_stages
from mugv.training.plan import describe

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")
TRAIN_YAMLS = sorted(glob.glob(f"{CONFIGS}/model/*.yaml") + glob.glob(f"{CONFIGS}/stages/*.yaml"))
CURRICULA = sorted(glob.glob(f"{CONFIGS}/curriculum/*.yaml"))
DATA = ["data.paths=[data/ds]"]  # the one required key the stage files leave to the command line


def test_configs_present():
    names = {os.path.relpath(p, CONFIGS) for p in TRAIN_YAMLS + CURRICULA}
    expected = {f"model/mugdit_{s}.yaml" for s in ("tiny", "1b", "4b", "10b", "18b")} | {
        "stages/demo_images.yaml",
        "stages/demo_video.yaml",
        "curriculum/demo.yaml",
        "curriculum/mugv_10b.yaml",
    }
    assert expected <= names
    assert len(glob.glob(f"{CONFIGS}/stages/10b_*.yaml")) == 7


@pytest.mark.parametrize("path", TRAIN_YAMLS, ids=lambda p: os.path.relpath(p, CONFIGS))
def test_train_config_loads(path):
    cfg = load_config(TrainConfig, path, DATA)
    name = os.path.basename(path)
    if name.startswith("mugdit_"):
        assert cfg.model.build() == MUGDiTConfig.from_preset(name[:-5])


@pytest.mark.parametrize("path", CURRICULA, ids=os.path.basename)
def test_curriculum_loads_every_stage(path, tmp_path):
    stages = resolve_stages(path, str(tmp_path), DATA)
    assert len(stages) >= 2
    entries = load_curriculum(path).stages
    for prev, stage, entry in zip(stages, stages[1:], entries[1:], strict=False):
        if entry.init == "previous":
            assert stage.cfg.train.init_from == prev.cfg.run_dir == os.path.join(str(tmp_path), prev.name)
        else:  # a checkpoint path (the 10B's DPO stage starts from merged LoRA-SFT weights)
            assert stage.cfg.train.init_from == entry.init != "none"
    assert stages[0].cfg.train.init_from == ""


def test_10b_stages_fit_80gb_with_their_recommended_layouts(tmp_path):
    stages = resolve_stages(os.path.join(CONFIGS, "curriculum", "mugv_10b.yaml"), str(tmp_path))
    assert [s.name for s in stages] == [
        "a_image256",
        "b_joint_lowres",
        "c_video360p",
        "d_video720p",
        "e_anneal",
        "f_sft",
        "g_dpo",
    ]
    for s in stages:
        p, dit = s.cfg.parallel, s.cfg.model.build()
        assert dit.hidden_size == 3456 and p.bf16 and p.distributed_optimizer, s.name
        assert s.world_size % (p.tp * p.pp * p.cp) == 0 and dit.num_heads % (p.tp * p.cp) == 0, s.name
        assert s.nproc == 8 and p.tp * p.cp <= 8, s.name  # TP/CP groups stay inside a node
        text = describe(s.cfg, s.world_size)
        total = float(re.search(r"-> total ~([\d.]+) GiB", text).group(1))
        assert 20.0 < total <= 72.0, (s.name, total)  # 8 GiB of an 80 GB GPU left for buffers
        with open(s.config_path) as f:  # the comment quotes the current estimate
            assert f"-> ~{total:.1f} GiB" in f.read(), (s.name, total)
    assert stages[3].cfg.data.token_budget == 50402  # one 720p 105-frame clip per micro-batch


def test_mistyped_key_in_a_stage_file_names_key_and_file(tmp_path):
    src = open(os.path.join(CONFIGS, "stages", "demo_images.yaml")).read()
    assert "\n  warmup_steps: 2\n" in src and "\nbase: base/demo.yaml\n" in src
    bad = tmp_path / "stage_typo.yaml"
    base = os.path.join(CONFIGS, "stages", "base", "demo.yaml")
    bad.write_text(src.replace("\n  warmup_steps: 2\n", "\n  warmup_step: 2\n").replace("base/demo.yaml", base))
    with pytest.raises(ConfigError, match=r"stage_typo\.yaml: key 'optim\.warmup_step'"):
        load_config(TrainConfig, str(bad))
    cur = tmp_path / "cur.yaml"  # the same file behind a curriculum: the stage is named too
    cur.write_text(f"stages:\n  - {{name: s1, config: {bad.name}, init: none}}\n")
    with pytest.raises(
        ConfigError, match=r"cur\.yaml: stage 's1': .*stage_typo\.yaml: key 'optim\.warmup_step'"
    ):
        resolve_stages(str(cur))


def test_mistyped_key_in_a_curriculum_file_names_key_and_file(tmp_path):
    cur = tmp_path / "cur.yaml"
    cur.write_text("stages:\n  - {name: s1, config: x.yaml, init: none, load_optimiser: true}\n")
    with pytest.raises(ConfigError, match=r"cur\.yaml: key 'load_optimiser'.*StageEntry"):
        resolve_stages(str(cur))


@pytest.mark.parametrize(
    "body, message",
    [
        ("stages:\n  - {name: s1, config: demo.yaml}\n", "first stage: init must be 'none'"),
        (
            "stages:\n  - {name: s1, config: d.yaml, init: none}\n  - {name: s1, config: d.yaml}\n",
            "used twice",
        ),
        ("stages:\n  - {name: 'a b', config: d.yaml, init: none}\n", "must be non-empty"),
        ("overrides: [run_dir=x]\nstages:\n  - {name: s1, config: d.yaml, init: none}\n", "sets run_dir"),
        ("stages: []\n", "no stages"),
        ("stages:\n  - {name: s1, config: d.yaml, init: ''}\n", "init is empty"),
        ("stages:\n  - {name: s1, config: d.yaml, init: none, use_ema: true}\n", "need an init"),
    ],
)
def test_bad_curriculum_is_rejected(tmp_path, body, message):
    cur = tmp_path / "cur.yaml"
    cur.write_text(body)
    with pytest.raises(ConfigError, match=message):
        resolve_stages(str(cur))


def test_cli_reports_a_typo_with_exit_code_2(capsys):
    path = os.path.join(CONFIGS, "stages", "demo_images.yaml")
    assert main(["train", path, "--dry-run", "optim.lrr=1", *DATA]) == 2
    assert "key 'optim.lrr'" in capsys.readouterr().err
    assert (
        main(["curriculum", os.path.join(CONFIGS, "curriculum", "demo.yaml"), "--dry-run", "trian.steps=1"])
        == 2
    )
    err = capsys.readouterr().err
    assert "stage 'demo_images'" in err and "trian" in err


# -- composition --------------------------------------------------------------------------------


def test_composed_stage_files_resolve_as_the_flat_files_did():
    """tests/data/stages_resolved.json: every stage resolved from its flat file before the stages
    were rewritten onto configs/stages/base/*.yaml (regenerate it on a deliberate change)."""
    with open(os.path.join(REPO, "tests", "data", "stages_resolved.json")) as f:
        want = json.load(f)
    stages = sorted(glob.glob(f"{CONFIGS}/stages/*.yaml"))
    assert set(want) <= {os.path.basename(p) for p in stages}  # stages added since are composed too
    for path in stages:
        with open(path) as f:
            assert f.read().count("\nbase: ") == 1, path  # composed, not repeated
        if os.path.basename(path) not in want:
            continue
        got = json.loads(json.dumps(to_dict(load_config(TrainConfig, path, validate=False))))
        default = json.loads(json.dumps(to_dict(TrainConfig())))
        # keys added to the schema since the snapshot are not set by the files: they keep their defaults
        assert _restrict(got, want[os.path.basename(path)]) == want[os.path.basename(path)], path
        assert _restrict(got, default, skip=want[os.path.basename(path)]) == _restrict(default, default, want[os.path.basename(path)])


def _restrict(d: dict, keys: dict, skip: dict | None = None) -> dict:
    """d limited to the (nested) keys of `keys`, leaving out the nested keys of `skip`."""
    out = {}
    for k, v in keys.items():
        sub = (skip or {}).get(k)
        if isinstance(v, dict) and isinstance(d.get(k), dict) and (sub is None or isinstance(sub, dict)):
            if v and set(v) - set(sub or {}):
                out[k] = _restrict(d[k], v, sub)
            elif not v and sub is None:
                out[k] = d[k]
        elif skip is None or k not in skip:
            out[k] = d.get(k)
    return out


def test_base_chain_merge_order_and_errors(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "root.yaml").write_text("optim: {lr: 0.5, warmup_steps: 3}\ndata: {paths: [a]}\n")
    (tmp_path / "mid.yaml").write_text("base: sub/root.yaml\noptim: {lr: 0.25}\ntrain: {steps: 7}\n")
    (tmp_path / "top.yaml").write_text("base: mid.yaml\ntrain: {steps: 9}\n")
    cfg = load_config(TrainConfig, str(tmp_path / "top.yaml"), ["optim.warmup_steps=4"])
    assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.train.steps, cfg.data.paths) == (0.25, 4, 9, ["a"])
    (tmp_path / "sub" / "root.yaml").write_text("optim: {lrr: 1}\n")  # the error names the base file
    with pytest.raises(ConfigError, match=r"root\.yaml: key 'optim\.lrr'"):
        load_config(TrainConfig, str(tmp_path / "top.yaml"))
    (tmp_path / "loop.yaml").write_text("base: loop2.yaml\n")
    (tmp_path / "loop2.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="chain loops"):
        load_config(TrainConfig, str(tmp_path / "loop.yaml"))
    (tmp_path / "nobase.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"nobase\.yaml: base file not found: missing\.yaml"):
        load_config(TrainConfig, str(tmp_path / "nobase.yaml"))


# -- validation at load -------------------------------------------------------------------------

STAGE = os.path.join(CONFIGS, "stages", "demo_images.yaml")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ([], r"data\.paths is empty"),
        (["optim.schedule=cosine", "optim.warmup_steps=20", "train.steps=20", *DATA],
         r"optim\.schedule=cosine .*train\.steps \(20\), which is not after optim\.warmup_steps \(20\)"),
        (["optim.schedule=wsd", "optim.warmup_steps=10", "optim.decay_steps=15", "train.steps=20", *DATA],
         r"wsd: optim\.warmup_steps \(10\) \+ optim\.decay_steps \(15\) exceed train\.steps \(20\)"),
        (["optim.min_lr=0.5", *DATA], r"optim\.min_lr \(0\.5\) <= optim\.lr"),
        (["parallel.tp=4", *DATA], r"parallel\.tp = 4 must divide the 2 attention heads"),
        (["parallel.pp=3", *DATA], r"depth 2 is not divisible by parallel\.pp x parallel\.vpp = 3"),
        (["parallel.tp=1", "parallel.cp=4", *DATA], r"parallel\.cp = 4 must divide the 2 heads"),
        (["parallel.overlap_param_gather=true", *DATA], r"overlap_param_gather needs"),
        (["parallel.backend=tee", *DATA], r"parallel\.backend must be"),
        (["train.init_use_ema=true", *DATA], r"need train\.init_from"),
        (["logging.interval=0", *DATA], r"logging\.interval = 0 must be >= 1"),
        (["checkpoint.keep_last=0", *DATA], r"checkpoint\.keep_last = 0"),
        (["preview.interval=5", "preview.prompts=[a]", *DATA], r"preview\.text_encoder"),
        (["data.batch_sizes.1x8=2", *DATA], r"batch_sizes\.1x8: bucket names are latent TxHxW"),
        (["data.num_workers=-1", *DATA], r"data\.num_workers = -1 must be >= 0"),
        (["optim.betas=[0.9]", *DATA], r"optim\.betas = \[0\.9\] must be two values"),
        (["lora.rank=8", *DATA], r"lora\.rank > 0 trains adapters on frozen base weights: set train\.init_from"),
        (["lora.rank=8", "lora.targets=[qkv,fc3]", "train.init_from=x", *DATA], r"lora\.targets = .*fc3"),
        (["lora.rank=8", "lora.dropout=0.1", "parallel.recompute=full", "train.init_from=x", *DATA],
         r"lora\.dropout > 0 with parallel\.recompute=full"),
        (["lora.rank=-1", *DATA], r"lora\.rank = -1 must be >= 0"),
    ],
)
def test_bad_values_fail_at_load_naming_key_and_file(overrides, message):
    with pytest.raises(ConfigError, match=r"demo_images\.yaml: .*" + message):
        load_config(TrainConfig, STAGE, overrides)


def test_train_without_data_paths_fails_fast_with_one_line_and_no_process_group(tmp_path):
    env = {**os.environ, "MUGV_LOG_LEVEL": "INFO"}
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "mugv.cli.main", "train", "configs/model/mugdit_tiny.yaml"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60, env=env)  # fmt: skip
    elapsed = time.monotonic() - start
    assert out.returncode == 2, out.stderr
    lines = (out.stdout + out.stderr).strip().splitlines()
    assert len(lines) == 1 and "mugdit_tiny.yaml" in lines[0] and "data.paths is empty" in lines[0], lines
    assert "distributed" not in out.stdout  # init_distributed logs its layout: it never ran
    print(f"config error after {elapsed:.1f} s (wall, with interpreter start-up, on a shared machine)")


def test_config_validation_does_not_import_megatron():
    """Loading and validating a config stays light (seconds, not Megatron-Core's start-up)."""
    code = ("import sys; from mugv.config import load_config; from mugv.training.config import TrainConfig; "
            f"load_config(TrainConfig, {STAGE!r}, ['data.paths=[x]']); "
            "print(sorted(m for m in sys.modules if m.startswith('megatron')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout


# -- keys, show, packaged configs ---------------------------------------------------------------


def test_every_key_of_our_config_classes_is_documented():
    keys = describe_keys(TrainConfig)
    owners = dict(_owners(TrainConfig))
    ours = ("mugv.training.config", "mugv.data.config")  # (the sampler's fields are documented elsewhere)
    undocumented = [k.key for k in keys if not k.doc and owners[k.key].__module__ in ours]
    assert not undocumented, undocumented
    lr = next(k for k in keys if k.key == "optim.lr")
    assert (lr.type, lr.default, lr.doc) == ("float", "0.0001", "peak learning rate")
    mix = next(k for k in keys if k.key == "data.mix.task_weights")
    assert mix.doc.startswith("relative shares of t2i / t2v / i2v samples per epoch. Empty = natural")
    assert mix.doc.endswith("probability i2v / (t2v + i2v).")  # the docstring entry's continuation lines


def _owners(cls, prefix=""):
    """(dotted key, the dataclass that declares it)"""
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        yield prefix + f.name, cls
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _owners(hints[f.name], f"{prefix}{f.name}.")


def test_config_keys_and_show_cli(capsys):
    assert main(["config", "keys", "optim"]) == 0
    out = capsys.readouterr().out.splitlines()
    from mugv.training.config import OptimConfig

    assert out[0].startswith("optim:") and len(out) == 1 + len(dataclasses.fields(OptimConfig))
    assert any(line.split()[:4] == ["optim.lr", "float", "=", "0.0001"] for line in out)
    assert main(["config", "keys", "--of", "data", "mix"]) == 0
    assert "mix.task_weights" in capsys.readouterr().out
    assert main(["config", "show", STAGE, "optim.lr=0.125", *DATA]) == 0
    shown = capsys.readouterr().out
    assert "lr: 0.125" in shown and "- data/ds" in shown and "preset: mugdit_tiny" in shown
    assert main(["config", "show", STAGE]) == 2
    assert "data.paths is empty" in capsys.readouterr().err
    cur = os.path.join(CONFIGS, "curriculum", "demo.yaml")
    assert main(["config", "show", cur]) == 0
    assert "name: demo_images" in capsys.readouterr().out


def test_configs_ship_with_the_package(tmp_path):
    packaged = packaged_config_dir()
    assert os.path.isfile(os.path.join(packaged, "curriculum", "demo.yaml"))
    for rel in ("configs/stages/demo_images.yaml", "stages/demo_images.yaml"):  # from any directory
        assert os.path.samefile(find_config(rel) if not os.path.isfile(rel) else rel, STAGE)
    with pytest.raises(ConfigError, match="config file not found: nope.yaml"):
        find_config("nope.yaml")
    with open(os.path.join(REPO, "pyproject.toml")) as f:
        assert 'mugv = ["configs/*/*.yaml", "configs/*/*/*.yaml"]' in f.read()
    assert load_config(DataConfig).paths == []

"""Every YAML under configs/ loads and validates; the 10B stages fit 80 GB devices by the
plan's estimate (and their comments quote it); typos fail naming the key and the file."""

import glob
import os
import re

import pytest

from mugv.cli.main import main
from mugv.config import ConfigError, load_config
from mugv.models import MUGDiTConfig
from mugv.training.config import TrainConfig
from mugv.training.curriculum import resolve_stages
from mugv.training.plan import describe

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")
TRAIN_YAMLS = sorted(glob.glob(f"{CONFIGS}/model/*.yaml") + glob.glob(f"{CONFIGS}/stages/*.yaml"))
CURRICULA = sorted(glob.glob(f"{CONFIGS}/curriculum/*.yaml"))


def test_configs_present():
    names = {os.path.relpath(p, CONFIGS) for p in TRAIN_YAMLS + CURRICULA}
    expected = {f"model/mugdit_{s}.yaml" for s in ("tiny", "1b", "4b", "10b", "18b")} | {
        "stages/demo_images.yaml",
        "stages/demo_video.yaml",
        "curriculum/demo.yaml",
        "curriculum/mugv_10b.yaml",
    }
    assert expected <= names
    assert len(glob.glob(f"{CONFIGS}/stages/10b_*.yaml")) == 5


@pytest.mark.parametrize("path", TRAIN_YAMLS, ids=lambda p: os.path.relpath(p, CONFIGS))
def test_train_config_loads(path):
    cfg = load_config(TrainConfig, path)
    name = os.path.basename(path)
    if name.startswith("mugdit_"):
        assert cfg.model.build() == MUGDiTConfig.from_preset(name[:-5])


@pytest.mark.parametrize("path", CURRICULA, ids=os.path.basename)
def test_curriculum_loads_every_stage(path, tmp_path):
    stages = resolve_stages(path, str(tmp_path))
    assert len(stages) >= 2
    for prev, stage in zip(stages, stages[1:], strict=False):
        assert stage.cfg.train.init_from == prev.cfg.run_dir == os.path.join(str(tmp_path), prev.name)
    assert stages[0].cfg.train.init_from == ""


def test_10b_stages_fit_80gb_with_their_recommended_layouts(tmp_path):
    stages = resolve_stages(os.path.join(CONFIGS, "curriculum", "mugv_10b.yaml"), str(tmp_path))
    assert [s.name for s in stages] == [
        "a_image256",
        "b_joint_lowres",
        "c_video360p",
        "d_video720p",
        "e_anneal",
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
    assert "\n  warmup_steps: 2\n" in src
    bad = tmp_path / "stage_typo.yaml"
    bad.write_text(src.replace("\n  warmup_steps: 2\n", "\n  warmup_step: 2\n"))
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
    assert main(["train", path, "--dry-run", "optim.lrr=1"]) == 2
    assert "key 'optim.lrr'" in capsys.readouterr().err
    assert (
        main(["curriculum", os.path.join(CONFIGS, "curriculum", "demo.yaml"), "--dry-run", "trian.steps=1"])
        == 2
    )
    err = capsys.readouterr().err
    assert "stage 'demo_images'" in err and "trian" in err

"""`mugv config keys [SECTION]` and `mugv config show CONFIG [key=value ...]`.

    mugv config keys                 # every TrainConfig key: type, default, doc
    mugv config keys optim           # one section
    mugv config keys --of prep       # the keys of another config kind (curriculum, prep, data)
    mugv config show configs/stages/demo_images.yaml data.paths=[d] optim.lr=1e-3

`show` prints the config exactly as `mugv train` (or `mugv curriculum`, for a file with a
top-level `stages:` key) would resolve and validate it; a bad key or value exits 2 naming it.
"""

from __future__ import annotations

import importlib

SCHEMAS = {
    "train": "mugv.training.config:TrainConfig",
    "curriculum": "mugv.training.curriculum:CurriculumConfig",
    "prep": "mugv.data.prep.pipeline:PrepConfig",
    "data": "mugv.data.config:DataConfig",
}


def register(sub) -> None:
    p = sub.add_parser("config", help="list config keys, or show a resolved config")
    cmds = p.add_subparsers(dest="config_command", metavar="<keys|show>")
    cmds.required = True
    k = cmds.add_parser("keys", help="every key of a config kind: type, default, one-line doc")
    k.add_argument("section", nargs="?", default=None, help="only this section or key, e.g. optim")
    k.add_argument("--of", choices=sorted(SCHEMAS), default="train", help="config kind (default: train)")
    k.set_defaults(func=run_keys)
    s = cmds.add_parser("show", help="print a config file resolved (bases, overrides) and validated")
    s.add_argument("config", help="YAML file (a stage, a curriculum, ...)")
    s.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. optim.lr=1e-4")
    s.add_argument("--of", choices=sorted(SCHEMAS), default=None,
                   help="config kind (default: curriculum for a file with `stages:`, else train)")  # fmt: skip
    s.set_defaults(func=run_show)


def schema(kind: str) -> type:
    module, name = SCHEMAS[kind].split(":")
    return getattr(importlib.import_module(module), name)


def run_keys(args) -> int:
    from mugv.config.schema import format_keys

    try:
        print(format_keys(schema(args.of), args.section))
    except KeyError as err:
        raise SystemExit(f"mugv config keys: {err.args[0]}") from None
    return 0


def run_show(args) -> int:
    from mugv.config.loader import find_config, load_config, read_yaml_chain, to_yaml

    kind = args.of
    if kind is None:
        top = read_yaml_chain(find_config(args.config))
        kind = "curriculum" if any("stages" in node for _, node in top) else "train"
    print(to_yaml(load_config(schema(kind), args.config, args.overrides)), end="")
    return 0

"""`mugv checkpoint verify PATH [--all]`: check a checkpoint's files against the checksums their
writers recorded (mugv.checkpoint.integrity), from one process, offline.

PATH is a checkpoint, a checkpoints root or a run directory (its latest complete checkpoint;
with --all every complete checkpoint under it). Exit code 1 if any file is missing, truncated or
changed; a checkpoint written before checksums existed is reported as not verifiable.
"""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("checkpoint", help="inspect checkpoints")
    cmds = p.add_subparsers(dest="checkpoint_command", metavar="<action>")
    cmds.required = True
    v = cmds.add_parser("verify", help="check a checkpoint's files against their recorded checksums")
    v.add_argument("path", help="checkpoint, checkpoints root or run directory")
    v.add_argument("--all", action="store_true", help="every complete checkpoint under a run directory")
    v.set_defaults(func=run_verify)


def checkpoints(path: str, every: bool) -> list[str]:
    import os

    from mugv.checkpoint.locate import is_complete, resolve, step_dirs

    if not every or is_complete(path):
        return [resolve(path)]
    for root in (os.path.join(path, "checkpoints"), path):
        found = [os.path.join(root, n) for n in step_dirs(root) if is_complete(os.path.join(root, n))]
        if found:
            return found
    return [resolve(path)]  # raises, naming the path


def run_verify(args) -> int:
    from mugv.checkpoint.integrity import recorded, verify

    bad = 0
    for ckpt in checkpoints(args.path, args.all):
        problems, nbytes = verify(ckpt)
        if problems:
            bad += 1
            print(f"{ckpt}: {len(problems)} problem(s)")
            for p in problems:
                print(f"  {p}")
        elif recorded(ckpt) is None:
            print(f"{ckpt}: not verifiable (no checksums recorded: written before mugv recorded them)")
        else:
            print(f"{ckpt}: OK ({len(recorded(ckpt))} files, {nbytes / 2**20:.1f} MiB verified)")
    return 1 if bad else 0

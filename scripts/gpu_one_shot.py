"""One recipe on one GPU machine that reaches nothing, in a few calls of limited size and time.

Run from the repository root (docs/training.md, "One-shot GPU run")::

    # here: the run's parts into an ignored folder, and the calls that carry them
    .venv/bin/python scripts/gpu_one_shot.py pack --recipe recipes/pilot_latents/sidecar.json --dir .device-pack
    # there, each call but the last: stage one call's parts
    python3 scripts/gpu_one_shot.py receive --dir .device-pack/call1 --stage /tmp/lclm-stage
    # there, the last call: stage the rest, then train until 8 minutes are up
    python3 scripts/gpu_one_shot.py receive --dir .device-pack/call2 --stage /tmp/lclm-stage \\
        && python3 scripts/gpu_one_shot.py train --stage /tmp/lclm-stage --minutes 8 --out $OUT
    # here: the candidate from the files that came back
    .venv/bin/python scripts/gpu_one_shot.py unpack --from FILES_AT --to candidates/gpu-sidecar

The logic is in ``lclm_rag.training.one_shot`` and ``lclm_rag.training.transfer``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the other machine has the repository, not an installed package

from lclm_rag.errors import LclmRagError  # noqa: E402
from lclm_rag.training import one_shot  # noqa: E402
from lclm_rag.training.transfer import MIB  # noqa: E402


def cmd_pack(args) -> int:
    manifest = one_shot.pack(args.recipe, args.dir, call_mib=args.call_mib, part_mib=args.part_mib, max_calls=args.max_calls,
                             resume_from=args.resume_from, margin_mib=args.margin_mib)
    directory = Path(args.dir).resolve()
    shown = str(directory.relative_to(REPO)) if directory.is_relative_to(REPO) else str(directory)
    calls = one_shot.run_calls(manifest, shown, stage=args.stage, minutes=args.minutes)
    (directory / "calls.json").write_text(json.dumps(calls, indent=1) + "\n")
    tree = manifest["tree_bytes"]
    print(f"pack {manifest['id']}: {manifest['bundle_bytes'] / MIB:.1f} MiB in {len(manifest['parts'])} parts, "
          f"{manifest['calls']} call(s) of at most {manifest['call_bytes'] / MIB:.1f} MiB"
          + ("" if tree is None else f" (beside the working tree's {tree / MIB:.1f} MiB)"))
    for part in manifest["parts"]:
        print(f"  call{part['call']}/{part['name']}  {part['size'] / MIB:7.2f} MiB  sha256 {part['sha256'][:16]}...")
    print("the device calls, in order, each within the machine's warm time of the last (also in calls.json):")
    for i, call in enumerate(calls, 1):
        print(f"  {i}. run(command={call['command']!r}, carry={call['carry']}, timeout_s={call['timeout_s']})")
    return 0


def cmd_receive(args) -> int:
    status = one_shot.receive_call(args.dir, args.stage)
    if status["complete"]:
        print(f"pack {status['id']}: all {status['calls']} call(s) received; {args.stage} is ready to train")
    else:
        print(f"pack {status['id']}: call {status['call']} of {status['calls']} received; still to come: "
              + ", ".join(f"call {c}" for c in status["missing_calls"]))
    return 0


def cmd_train(args) -> int:
    summary = one_shot.train_time_boxed(args.stage, args.out, args.minutes, args.device, mixed_precision=args.mixed_precision,
                                        save_every=args.save_every, max_steps=args.max_steps, reserve_s=args.reserve_s)
    print(json.dumps(summary, indent=1))
    if "pieces" not in summary:
        log = Path(args.out) / "train.log"
        print(log.read_text(errors="replace")[-6000:] if log.is_file() else "", file=sys.stderr)
        return 1
    return 0 if summary["stopped"] != "failed" else 1


def cmd_unpack(args) -> int:
    dest = one_shot.unpack(args.source, args.to)
    print(f"candidate in {dest}; evaluate it with --checkpoint {dest}/model")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="here: write a recipe's parts into an ignored folder, grouped into calls")
    p.add_argument("--recipe", required=True)
    p.add_argument("--dir", default=".device-pack", help="ignored folder for the parts (default .device-pack)")
    p.add_argument("--resume-from", metavar="CANDIDATE", help="continue the run from this compact candidate there")
    p.add_argument("--call-mib", type=float, help="what one call may carry besides the working tree (default: 64 MiB "
                   "less the tree, less --margin-mib)")
    p.add_argument("--margin-mib", type=float, default=1.0, help="room left in each call for the tree to grow")
    p.add_argument("--part-mib", type=float, default=16.0, help="largest part")
    p.add_argument("--max-calls", type=int, default=2, help="refuse a pack that needs more calls")
    p.add_argument("--stage", default="/tmp/lclm-stage", help="staging folder there (for the printed calls)")
    p.add_argument("--minutes", type=float, default=8, help="training time there (for the printed calls)")
    p.set_defaults(func=cmd_pack)
    p = sub.add_parser("receive", help="there: check and stage one call's parts; assemble them once all are there")
    p.add_argument("--dir", required=True, help="the carried folder of one call (DIR/callN)")
    p.add_argument("--stage", default="/tmp/lclm-stage")
    p.set_defaults(func=cmd_receive)
    p = sub.add_parser("train", help="there: run the staged recipe until it ends or the time is up; candidate to --out")
    p.add_argument("--stage", default="/tmp/lclm-stage")
    p.add_argument("--out", required=True, help="where the candidate, its log and a summary go ($OUT)")
    p.add_argument("--minutes", type=float, required=True, help="time for this command, from its start to its last file")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], help="default: bf16 on cuda, no on cpu")
    p.add_argument("--save-every", type=int, help="steps between checkpoints (default: the recipe's); a stop at the "
                   "deadline loses the steps since the last")
    p.add_argument("--max-steps", type=int, help="stop after this many steps")
    p.add_argument("--reserve-s", type=float, default=45.0, help="seconds kept at the end for the candidate's export")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("unpack", help="here: the candidate directory from the files the training call sent back")
    p.add_argument("--from", dest="source", required=True, help="the folder the files came back to")
    p.add_argument("--to", required=True, help="candidate directory to write (e.g. candidates/gpu-NAME)")
    p.set_defaults(func=cmd_unpack)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LclmRagError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

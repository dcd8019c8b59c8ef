"""`python -m bdm.toy build | retrain STAGE… | eval | export-webui WEBUI_DIR`."""
from __future__ import annotations

import argparse
import sys

from ..cli import run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bdm.toy", description="The toy world: build, evaluate and "
                                "export the embedded toy models.")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="train every toy model from scratch (seeded)")
    b.add_argument("--quick", action="store_true", help="tiny steps: a smoke test of the whole build path")
    b.add_argument("--output", help="folder for the weights (default: the package's bdm/toy/weights)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--threads", type=int, help="torch CPU threads (on a shared, busy machine 1 is often faster)")
    b.add_argument("--scale", type=float, default=1.0, help="multiply every stage's step count (e.g. 0.5 on a "
                   "busy machine; the committed weights record theirs in build.json)")
    r = sub.add_parser("retrain", help="retrain stages from the built backbone (the rest stays)")
    r.add_argument("stages", nargs="+", metavar="STAGE",
                   help="chinese_clip, bdm (reads the new or the shipped Chinese CLIP), judge, lora, controlnet, "
                   "dreambooth, ti")
    r.add_argument("--weights", help="folder of a finished build (default: the package's bdm/toy/weights)")
    r.add_argument("--seed", type=int, help="the stages' seed (default: the build's, from its build.json)")
    r.add_argument("--threads", type=int, help="torch CPU threads")
    r.add_argument("--scale", type=float, help="multiply the stages' step counts (default: the build's)")
    r.add_argument("--quick", action="store_true", default=None,
                   help="tiny steps (default: as the build was made, from its build.json)")
    e = sub.add_parser("eval", help="the paper's claims as measured numbers, with a contact sheet per row")
    e.add_argument("--weights", help="folder of toy weights (default: the package's)")
    e.add_argument("--images", type=int, default=216, help="images per row (≥ 100 for the report)")
    e.add_argument("--output", default="toy-eval", help="folder for contact sheets and eval.json")
    e.add_argument("--cfg", type=float, default=None, help="CFG scale (default: the toy default)")
    e.add_argument("--steps", type=int, default=20)
    e.add_argument("--sampler", default=None)
    e.add_argument("--rows", nargs="+", help="only these rows (by key)")
    e.add_argument("--threads", type=int, help="torch CPU threads")
    x = sub.add_parser("export-webui", help="put the toy models where an AUTOMATIC1111 WebUI or Forge finds them")
    x.add_argument("webui_dir", help="the WebUI's (or Forge's) root folder")
    x.add_argument("--weights", help="folder of toy weights (default: the package's)")
    args = p.parse_args(argv)
    if getattr(args, "threads", None):
        import torch
        torch.set_num_threads(args.threads)
    if args.command == "build":
        from .build import build
        build(args.output, quick=args.quick, seed=args.seed, scale=args.scale)
    elif args.command == "retrain":
        from .build import retrain
        retrain(args.stages, args.weights, seed=args.seed, scale=args.scale, quick=args.quick)
    elif args.command == "eval":
        from .evaluate import evaluate, print_table
        kwargs = {k: v for k, v in {"cfg": args.cfg, "sampler": args.sampler}.items() if v is not None}
        result = evaluate(args.weights, args.images, args.output, steps=args.steps, rows=args.rows, **kwargs)
        print_table(result)
    else:
        from .export import export_webui
        export_webui(args.webui_dir, args.weights)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))

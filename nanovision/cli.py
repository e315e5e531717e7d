"""The `nanovision` command."""

import argparse
import logging
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="nanovision", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    quickstart = commands.add_parser("quickstart", help="base -> vision -> sft on the built-in data, then evaluate")
    quickstart.add_argument("--output_dir", default="outputs/quickstart")
    quickstart.add_argument("--seed", type=int, default=0)
    evaluate = commands.add_parser("eval", help="held-out accuracy of a checkpoint on the built-in shapes questions")
    evaluate.add_argument("--model", required=True)
    evaluate.add_argument("--num_test", type=int, default=400)
    evaluate.add_argument("--seed", type=int, default=0)
    commands.add_parser("train", help="one training stage (see `nanovision train --help`)", add_help=False)
    from .serving.cli import add_infer_arguments

    add_infer_arguments(commands.add_parser("infer", help="generate with vLLM: prompt, batch file, chat"))
    commands.add_parser("serve", help="vLLM's OpenAI-compatible server: nanovision serve CKPT [vLLM serve flags]",
                        add_help=False)
    args, rest = parser.parse_known_args(argv)
    quiet = args.command in ("infer", "serve") and not getattr(args, "verbose", False) and "--verbose" not in rest
    logging.basicConfig(level=logging.ERROR if quiet else logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if quiet:
        logging.getLogger("nanovision").setLevel(logging.WARNING)

    if args.command == "train":
        from .training.arguments import argument_parser
        from .training.stages import run_stage

        run_stage(*argument_parser(prog="nanovision train").parse_args_into_dataclasses(rest))
        return
    if args.command == "serve":
        from .serving.cli import run_serve

        return run_serve(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "quickstart":
        from .training.quickstart import run

        run(output_dir=args.output_dir, seed=args.seed)
    elif args.command == "eval":
        from .training.evaluate import evaluate_checkpoint

        evaluate_checkpoint(args.model, num_test=args.num_test, seed=args.seed)
    elif args.command == "infer":
        from .serving.cli import run_infer

        return run_infer(args)


if __name__ == "__main__":
    sys.exit(main())

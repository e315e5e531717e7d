"""The `nanovision` command."""

import argparse
import logging


def main(argv=None):
    parser = argparse.ArgumentParser(prog="nanovision", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    quickstart = commands.add_parser("quickstart", help="train a tiny model on the built-in data, reload it, generate")
    quickstart.add_argument("--output_dir", default="outputs/quickstart")
    quickstart.add_argument("--max_steps", type=int, default=300)
    quickstart.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    if args.command == "quickstart":
        from .training.quickstart_text import run

        run(output_dir=args.output_dir, max_steps=args.max_steps, seed=args.seed)


if __name__ == "__main__":
    main()

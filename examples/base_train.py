"""The base training stage; runs with python, accelerate launch or torchrun.

    python examples/base_train.py --output_dir out/base [--model ...] [any `nanovision train` flag]
"""

import logging
import sys

from nanovision.training.arguments import argument_parser
from nanovision.training.stages import run_stage

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    run_stage(*argument_parser().parse_args_into_dataclasses(["--stage", "base", *sys.argv[1:]]))

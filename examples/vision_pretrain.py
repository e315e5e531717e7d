"""The vision training stage; runs with python, accelerate launch or torchrun.

    python examples/vision_pretrain.py --output_dir out/vision [--model ...] [any StageArguments flag]
"""

import logging
import sys

from transformers import HfArgumentParser

from nanovision.training.stages import StageArguments, run_stage

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    (args,) = HfArgumentParser(StageArguments).parse_args_into_dataclasses(["--stage", "vision", *sys.argv[1:]])
    run_stage(args)

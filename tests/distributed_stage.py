"""One training stage for the multi-process tests, run with `python` or `accelerate launch`:

    distributed_stage.py OUTPUT_DIR STAGE '{"StageArguments or NanoVisionTrainingArguments field": value, ...}'

Besides `run_stage`'s output it writes OUTPUT_DIR/trained_logits.pt: fixed inputs and the logits of the model as
trained (still wrapped by DDP/FSDP), for comparison with what `from_pretrained` makes of OUTPUT_DIR/final, and
OUTPUT_DIR/exit-rank<R>.json: whether the process group was still alive as the process exited.
"""

import atexit
import json
import os
import sys
from pathlib import Path

import accelerate.state
import torch
from accelerate.utils import DistributedType
from conftest import probe_inputs
from transformers import TrainerCallback

from nanovision.training.arguments import argument_parser
from nanovision.training.stages import run_stage


def allow_fsdp_on_cpu():
    """Accelerate (1.15) turns ACCELERATE_USE_FSDP into an FSDP run only on accelerator devices: on a CPU-only
    machine AcceleratorState keeps MULTI_CPU and drops the FSDP plugin, so a `distributed_type: FSDP` config quietly
    trains with gloo DDP. torch's fully_shard runs on CPU with gloo; give Accelerate the FSDP state it would set up
    on GPUs, so the Trainer + Accelerate FSDP2 path runs here."""
    init = accelerate.state.AcceleratorState.__init__

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            accelerate.state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    accelerate.state.AcceleratorState.__init__ = __init__


class SaveTrainedLogits(TrainerCallback):
    def __init__(self, path):
        self.path = path

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if os.environ.get("ACCELERATE_USE_FSDP") == "true":  # launched with an FSDP config: no quiet DDP fallback
            from torch.distributed.fsdp import FSDPModule

            assert isinstance(model, FSDPModule), f"FSDP launch, but the model is a {type(model).__name__}"

    def on_train_end(self, args, state, control, model=None, **kwargs):
        inputs = probe_inputs(model.config)
        model.eval()
        with torch.no_grad():  # on every rank: FSDP gathers each unit's weights in the forward
            logits = model(**inputs).logits
        if state.is_world_process_zero:
            torch.save({"inputs": inputs, "logits": logits}, self.path)


def record_process_group_at_exit(output_dir):
    """Registered before run_stage's own exit handler, so it runs after it (atexit runs last-in first-out)."""
    rank = os.environ.get("RANK", "0")

    def record():
        Path(output_dir, f"exit-rank{rank}.json").write_text(
            json.dumps({"process_group_alive": torch.distributed.is_initialized()}))

    atexit.register(record)


if __name__ == "__main__":
    output_dir, stage, settings = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    allow_fsdp_on_cpu()
    record_process_group_at_exit(output_dir)
    run_stage(*argument_parser().parse_dict({"stage": stage, "output_dir": output_dir, **settings}),
              callbacks=[SaveTrainedLogits(f"{output_dir}/trained_logits.pt")])

import subprocess
import sys

TINY_QUICKSTART = """
import logging
from nanovision.training import quickstart

quickstart.STAGES["vision"].update(tower_pretrain_steps=2, tower_pretrain_batch_size=8)  # a stage-only setting
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")  # as `nanovision quickstart`
quickstart.run(output_dir={output_dir!r}, num_test=4, builtin_train_size=40, max_steps=2, logging_steps=1, depth=2,
               head_dim=32, vocab_size=400, pack_max_length=256, image_size=32, patch_size=8, vision_hidden_size=32,
               vision_layers=1, vision_heads=2, bf16=False,
               attn_implementation="sdpa")  # nanovision_varlen would run in the tests' Triton interpreter
"""


def test_quickstart_output_piped_to_a_file_reads_as_plain_lines(tmp_path):
    """Piped, the quickstart draws no progress bars (no carriage returns), announces each stage before it starts,
    says its precision and each stage's step count and times, and prints the Trainer's logs as lines."""
    done = subprocess.run([sys.executable, "-c", TINY_QUICKSTART.format(output_dir=str(tmp_path))],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=900)
    output = done.stdout.decode()  # not text=True: universal newlines would turn every "\r" into "\n"
    assert done.returncode == 0, output[-3000:]
    assert "\r" not in output
    assert "nanovision quickstart on the CPU, precision: fp32\n" in output
    for number, stage in enumerate(("base", "vision", "sft"), 1):
        announced = output.index(f"== stage {number}/3: {stage} (")
        begins = output.index(f"[{stage}] training 2 steps in fp32")
        assert announced < begins < output.index(f"[{stage}] trained 2 steps in ") < output.index(
            f"[{stage}] stage done in ")
    assert output.count("'loss': ") >= 6  # the Trainer's log lines, two steps a stage
    assert output.index("== evaluation") < output.index("accuracy: ")

"""Generate with vLLM from a nanovision checkpoint: the same entry as `nanovision infer`.

    python examples/vllm_inference.py --model_path CKPT --prompt "a red circle"
    python examples/vllm_inference.py --model_path CKPT --chat_template --prompt "What color is it?" --image red.png
    python examples/vllm_inference.py --model_path CKPT --batch_file prompts.jsonl --output results.jsonl
    python examples/vllm_inference.py --model_path CKPT --chat
    python examples/vllm_inference.py --model_path CKPT --benchmark --num_prompts 256 --compare_hf
"""

import sys

from nanovision.serving.cli import main

if __name__ == "__main__":  # vLLM starts worker processes: keep the entry guarded
    sys.exit(main())

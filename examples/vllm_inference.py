"""Generate with vLLM from a nanovision checkpoint: the same entry as `nanovision infer`.

    python examples/vllm_inference.py --model_path CKPT --prompt "What color is it?" --image red.png
    python examples/vllm_inference.py --model_path CKPT --no_chat_template --prompt "<|bos|>a red circle"
    python examples/vllm_inference.py --model_path CKPT --batch_file prompts.jsonl --output results.jsonl
    python examples/vllm_inference.py --model_path CKPT --chat
"""

import sys

from nanovision.serving.cli import main

if __name__ == "__main__":  # vLLM starts worker processes: keep the entry guarded
    sys.exit(main())

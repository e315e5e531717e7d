"""Convert a transformers causal LM checkpoint (Llama, Mistral, Qwen2, Qwen3 or nanochat) into a nanovision folder.

    python examples/convert_checkpoint.py path/to/source path/to/output [--dtype bfloat16]

The source must be a local folder (nothing is downloaded). The output loads with
`AutoModelForCausalLM.from_pretrained(output, trust_remote_code=True)`, and carries the source's tokenizer if it had one.
"""

import argparse

from nanovision.conversion import convert_checkpoint


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="local folder of the transformers checkpoint to convert")
    parser.add_argument("dst", help="folder to write the nanovision checkpoint to")
    parser.add_argument("--dtype", default=None,
                        help="torch dtype of the saved weights, e.g. bfloat16 or float32 (default: the source's)")
    args = parser.parse_args(argv)
    model = convert_checkpoint(args.src, args.dst, dtype=args.dtype)
    config = model.config
    print(f"wrote {args.dst}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {model.dtype}")


if __name__ == "__main__":
    main()

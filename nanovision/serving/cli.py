"""`nanovision infer`: generation with vLLM from the command line (also `examples/vllm_inference.py`).

  --prompt TEXT [--image PATH ...]         one completion, printed
  --batch_file FILE [--output OUT.jsonl]   text lines, or JSONL {"prompt": ..., "images": [...]}; JSONL results
  --chat                                   interactive chat on stdin: a line is a user turn, `/image PATH`
                                           attaches an image to the next turn, `/reset` clears, `/exit` quits
  --benchmark --num_prompts N              output tokens/s, requests/s and latency on random prompts
"""

from __future__ import annotations

import argparse
import json
import sys


def add_infer_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model_path", required=True, help="nanovision checkpoint folder (text or VLM)")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prompt", help="prompt text (used as is unless --chat_template)")
    mode.add_argument("--batch_file", help="text file (one prompt a line) or JSONL with 'prompt' and optional "
                                           "'images' (paths or data URLs)")
    mode.add_argument("--chat", action="store_true", help="interactive chat on stdin")
    mode.add_argument("--benchmark", action="store_true", help="measure throughput on random prompts")
    parser.add_argument("--image", action="append", default=[], metavar="PATH",
                        help="image for --prompt (or the first --chat turn); repeat for several")
    parser.add_argument("--output", help="JSONL results of --batch_file (default: stdout); JSON of --benchmark")
    parser.add_argument("--chat_template", action="store_true",
                        help="wrap --prompt / --batch_file prompts as a user turn of the chat template")
    parser.add_argument("--num_prompts", type=int, default=32, help="--benchmark: number of prompts")
    parser.add_argument("--prompt_len", type=int, default=128, help="--benchmark: prompt tokens")
    parser.add_argument("--compare_hf", action="store_true", help="--benchmark: also time HF generate")
    parser.add_argument("--tensor_parallel_size", type=int, default=1)
    parser.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32")
    parser.add_argument("--max_tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--top_k", type=int, default=0, help="0 disables top-k")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed")
    parser.add_argument("--max_model_len", type=int, default=None)
    parser.add_argument("--gpu_memory_utilization", type=float, default=None)
    parser.add_argument("--trust_remote_code", action="store_true")
    return parser


def build_parser() -> argparse.ArgumentParser:
    return add_infer_arguments(argparse.ArgumentParser(prog="nanovision infer", description=__doc__,
                                                       formatter_class=argparse.RawDescriptionHelpFormatter))


def _engine(args):
    from .engine import create_vllm_engine

    kwargs = {}
    for name in ("max_model_len", "gpu_memory_utilization", "seed"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    if args.trust_remote_code:
        kwargs["trust_remote_code"] = True
    return create_vllm_engine(args.model_path, tensor_parallel_size=args.tensor_parallel_size, dtype=args.dtype,
                              **kwargs)


def _sampling(args) -> dict:
    kwargs = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    if args.seed is not None:
        kwargs["seed"] = args.seed
    return kwargs


def read_batch_file(path: str) -> list[dict]:
    """Rows {"prompt": str, "images": list}: JSONL when the first non-empty line is a JSON object, else one prompt
    per non-empty line."""
    with open(path, encoding="utf-8") as handle:
        lines = [line.rstrip("\n") for line in handle]
    lines = [line for line in lines if line.strip()]
    if lines and lines[0].lstrip().startswith("{"):
        rows = []
        for number, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise SystemExit(f"{path}:{number}: not valid JSON: {err}") from err
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise SystemExit(f"{path}:{number}: expected an object with a string 'prompt'")
            images = row.get("images", row.get("image")) or []
            rows.append({**row, "images": [images] if isinstance(images, str) else list(images)})
        return rows
    return [{"prompt": line, "images": []} for line in lines]


def _as_chat(prompt: str, images: list) -> list[dict]:
    return [{"role": "user", "content": [*({"type": "image", "image": image} for image in images),
                                         {"type": "text", "text": prompt}]}]


def _complete(engine, rows: list[dict], args) -> list:
    if args.chat_template:
        return engine.chat([_as_chat(row["prompt"], row["images"]) for row in rows], **_sampling(args))
    return engine.generate([row["prompt"] for row in rows], images=[row["images"] or None for row in rows],
                           **_sampling(args))


def run_chat(engine, args, stdin=None, stdout=None) -> None:
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    interactive = stdin.isatty()
    history, pending = [], list(args.image)
    while True:
        if interactive:
            stdout.write("user> ")
            stdout.flush()
        line = stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history, pending = [], []
            print("(conversation cleared)", file=stdout, flush=True)
            continue
        if line.startswith("/image"):
            path = line[len("/image"):].strip()
            if not path:
                print("usage: /image PATH", file=stdout, flush=True)
                continue
            pending.append(path)
            print(f"(image attached: {path})", file=stdout, flush=True)
            continue
        message = _as_chat(line, pending)[0]
        try:
            reply = engine.chat(history + [message], **_sampling(args))[0]
        except (ValueError, OSError) as err:
            print(f"error: {err}", file=stdout, flush=True)
            continue
        history += [message, {"role": "assistant", "content": str(reply)}]
        pending = []
        print(f"assistant: {reply}", file=stdout, flush=True)


def run_infer(args) -> int:
    if args.image and (args.batch_file or args.benchmark):
        raise SystemExit("--image goes with --prompt or --chat; put batch images in the --batch_file JSONL")
    if args.benchmark:
        from .engine import benchmark_throughput, compare_backends, format_table

        engine = _engine(args)
        if args.compare_hf:
            result = compare_backends(args.model_path, args.num_prompts, args.prompt_len, args.max_tokens,
                                      engine=engine)
        else:
            result = benchmark_throughput(engine, args.num_prompts, args.prompt_len, args.max_tokens)
            print(format_table([result], ["num_prompts", "output_tokens_per_s", "requests_per_s", "latency_s",
                                          "elapsed_s"]))
        if args.output:
            with open(args.output, "w", encoding="utf-8") as handle:
                json.dump(result, handle, indent=2)
        engine.close()
        return 0

    engine = _engine(args)
    try:
        if args.chat:
            run_chat(engine, args)
        elif args.prompt is not None:
            print(_complete(engine, [{"prompt": args.prompt, "images": list(args.image)}], args)[0])
        else:
            rows = read_batch_file(args.batch_file)
            completions = _complete(engine, rows, args) if rows else []
            out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
            try:
                for row, completion in zip(rows, completions):
                    record = {"prompt": row["prompt"], "images": row["images"], "completion": str(completion),
                              "token_ids": completion.token_ids, "finish_reason": completion.finish_reason}
                    out.write(json.dumps(record, ensure_ascii=False) + "\n")
            finally:
                if out is not sys.stdout:
                    out.close()
            if args.output:
                print(f"wrote {len(rows)} results to {args.output}", file=sys.stderr)
    finally:
        engine.close()
    return 0


def main(argv=None) -> int:
    return run_infer(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

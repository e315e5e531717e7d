"""`nanovision serve CKPT` (vLLM's OpenAI-compatible server, on its CPU defaults: no KV cache setting) on 127.0.0.1
answering the official `openai` client: a VLM checkpoint with nanovision installed (the plugin entry point, no extra
model flag). Answers are compared token by token with HF greedy `generate` (the server reports token ids through
--return-tokens-as-token-ids and logprobs)."""

import socket
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

from serving_checkpoints import (  # noqa: E402
    build_vlm_checkpoint,
    color_image,
    hf_greedy,
    png_data_url,
    running_server,
    train_tiny_tokenizer,
)

N = 8
QUESTIONS = ["what color is the circle", "what shape is it", "is the square red", "the circle is",
             "a shape", "what is blue", "green or red", "the color"]
COLORS = [(220, 30, 30), (20, 40, 210), (10, 200, 10), (240, 240, 20)]

def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _messages(question, image):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_url(image)}},
                                         {"type": "text", "text": question}]}]


def _cases():
    return [(QUESTIONS[i % len(QUESTIONS)], color_image(COLORS[i % len(COLORS)], size=(30 + i, 40)))
            for i in range(32)]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    root = tmp_path_factory.mktemp("openai")
    ckpt = build_vlm_checkpoint(root / "vlm", train_tiny_tokenizer())
    # Expected answers first: HF runs faster before the server's processes share the cores.
    model = AutoModelForImageTextToText.from_pretrained(ckpt).eval()
    processor = AutoProcessor.from_pretrained(ckpt)
    expected = []
    for question, image in _cases():
        prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                             {"type": "text", "text": question}]}],
                                               add_generation_prompt=True)
        expected.append(hf_greedy(model, processor, prompt, [image], N))
    del model

    port = _free_port()
    cmd = [sys.executable, "-m", "nanovision.cli", "serve", str(ckpt), "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", "--max-model-len", "512", "--seed", "0", "--return-tokens-as-token-ids",
           "--trust-request-chat-template", "--uvicorn-log-level", "warning"]
    with running_server(cmd, root / "server.log", f"http://127.0.0.1:{port}"):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=120, max_retries=0)
        yield dict(client=client, model=client.models.list().data[0].id, expected=expected, ckpt=ckpt,
                   log=root / "server.log")


def _ask(served, messages, extra_body=None, **kwargs):
    return served["client"].chat.completions.create(model=served["model"], messages=messages, max_tokens=N,
                                                    temperature=0, logprobs=True,
                                                    extra_body={"ignore_eos": True, **(extra_body or {})}, **kwargs)


def _token_ids(logprobs_content):
    return [int(item.token.removeprefix("token_id:")) for item in logprobs_content]


def _check_answer(served, index):
    question, image = _cases()[index]
    response = _ask(served, _messages(question, image))
    choice = response.choices[0]
    assert _token_ids(choice.logprobs.content) == served["expected"][index], index
    return choice


def test_server_starts_quietly_and_answers_text(served):
    log = served["log"].read_text()
    assert log.startswith("nanovision serve: starting vLLM's OpenAI-compatible server for"), log[:2000]
    assert "Attempted to load weight" not in log and " INFO " not in log, log[-4000:]
    response = _ask(served, [{"role": "user", "content": "what color is the circle"}])
    assert response.choices[0].finish_reason == "length" and len(response.choices[0].logprobs.content) == N


def test_chat_completion_with_base64_image(served):
    from transformers import AutoTokenizer

    choice = _check_answer(served, 0)
    assert choice.finish_reason == "length" and isinstance(choice.message.content, str)
    tokenizer = AutoTokenizer.from_pretrained(served["ckpt"])
    # vLLM's incremental detokenizer holds back a trailing incomplete UTF-8 sequence (random weights emit bytes)
    assert tokenizer.decode(served["expected"][0], skip_special_tokens=True).startswith(choice.message.content)


def test_streaming_chat_completion(served):
    question, image = _cases()[1]
    stream = _ask(served, _messages(question, image), stream=True)
    text, ids, finish = "", [], None
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        text += choice.delta.content or ""
        if choice.logprobs and choice.logprobs.content:
            ids += _token_ids(choice.logprobs.content)
        finish = choice.finish_reason or finish
    assert ids == served["expected"][1] and finish == "length"
    assert text == _ask(served, _messages(question, image)).choices[0].message.content


def test_32_concurrent_requests_all_correct(served):
    with ThreadPoolExecutor(max_workers=32) as pool:
        choices = list(pool.map(lambda i: _check_answer(served, i), range(32)))
    assert len(choices) == 32
    assert len({tuple(ids) for ids in served["expected"]}) > 1  # the answers really differ by image and question


def test_bad_requests_get_400_and_the_server_keeps_serving(served):
    bad_image = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}},
        {"type": "text", "text": "what color"}]}]
    with pytest.raises(openai.BadRequestError) as err:
        _ask(served, bad_image)
    assert err.value.status_code == 400

    # A chat template that drops the image parts: two images, no placeholder.
    text_only = ("{% for m in messages %}{% if m['content'] is string %}{{ m['content'] }}{% else %}"
                 "{% for p in m['content'] %}{% if p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endfor %}"
                 "{% endif %}{% endfor %}")
    two_images = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": png_data_url(color_image(COLORS[0]))}},
        {"type": "image_url", "image_url": {"url": png_data_url(color_image(COLORS[1]))}},
        {"type": "text", "text": "what color"}]}]
    with pytest.raises(openai.BadRequestError) as err:
        _ask(served, two_images, extra_body={"chat_template": text_only})
    assert err.value.status_code == 400 and "0 '<image>' placeholder(s) but 2 image(s)" in str(err.value)

    # More placeholders than images: a typed <image> next to the one image part.
    extra_placeholder = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": png_data_url(color_image(COLORS[0]))}},
        {"type": "text", "text": "what color is <image>"}]}]
    with pytest.raises(openai.BadRequestError) as err:
        _ask(served, extra_placeholder)
    assert err.value.status_code == 400 and "2 '<image>' placeholder(s) but 1 image(s)" in str(err.value)

    _check_answer(served, 2)  # still serving, still right


def test_text_only_requests_holding_placeholders_get_400(served):
    """No image, yet `<image>` in the prompt: as completion text, as token ids (<image> is id 6) and as a chat
    message's string content. vLLM runs no multimodal processing for these; nanovision serve's tokenizer mode
    ("nanovision", the plugin's renderer) refuses them in the API server, and the server goes on."""
    client, model = served["client"], served["model"]
    no_image = "1 '<image>' placeholder(s) but no image was given: attach one image per placeholder or remove"
    for prompt in ("<|bos|>what color is <image>", [0, 20, 6, 21]):
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=model, prompt=prompt, max_tokens=2)
        assert err.value.status_code == 400 and no_image in str(err.value), prompt
    with pytest.raises(openai.BadRequestError) as err:
        _ask(served, [{"role": "user", "content": "<image> what color is the circle"}])
    assert err.value.status_code == 400 and no_image in str(err.value)

    # still serving: text without placeholders, as text and as ids, and an image with its placeholder
    for prompt in ("<|bos|>what color is the circle", [0, 20, 21]):
        completion = client.completions.create(model=model, prompt=prompt, max_tokens=2,
                                               extra_body={"ignore_eos": True})
        assert completion.choices[0].finish_reason == "length", prompt
    _check_answer(served, 3)

"""The README's "Use" and "Serving with vLLM" code blocks, run as written so that they cannot drift: python blocks
exec'd in order, bash blocks run by bash with this Python's commands first on PATH, in a folder that holds a tiny
quickstart-like checkpoint at outputs/quickstart/sft/final. The one block not run is the install command (it starts
with `.venv/bin/pip`): the test runs in the environment it installs."""

import re
import subprocess
from pathlib import Path

import pytest
from serving_checkpoints import build_vlm_checkpoint, running_server, serving_env, train_tiny_tokenizer

README = Path(__file__).resolve().parents[1] / "README.md"
CKPT = "outputs/quickstart/sft/final"


def readme_blocks(section: str) -> list[tuple[str, str]]:
    """(language, code) of each fenced block in the README section titled `section`."""
    text = README.read_text()
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```(\w+)\n(.*?)```", text[start:end if end != -1 else None], flags=re.S)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    build_vlm_checkpoint(tmp_path / CKPT, train_tiny_tokenizer())
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_use_section_runs_as_written(workdir, capsys):
    blocks = readme_blocks("Use")
    assert [language for language, _ in blocks] == ["python", "python"]
    for _, code in blocks:
        exec(compile(code, f"README.md ({code.splitlines()[0]})", "exec"), {"__name__": "__readme__"})
    assert (workdir / "text-ckpt" / "config.json").is_file() and capsys.readouterr().out.strip()


def test_serving_section_runs_as_written(workdir, capsys):
    pytest.importorskip("vllm")
    pytest.importorskip("openai")
    blocks = readme_blocks("Serving with vLLM")
    assert [language for language, _ in blocks] == ["bash", "bash", "python", "bash"]
    assert blocks[0][1].startswith(".venv/bin/pip install")  # the install: not run here
    serve, client, infer = blocks[1][1], blocks[2][1], blocks[3][1]
    port = int(re.search(r"--port (\d+)", serve).group(1))
    with running_server(["bash", "-c", serve], workdir / "serve.log", f"http://localhost:{port}"):
        exec(compile(client, "README.md (openai client)", "exec"), {"__name__": "__readme__"})
    assert capsys.readouterr().out.endswith("\n")
    result = subprocess.run(["bash", "-c", infer], capture_output=True, text=True, timeout=600, env=serving_env())
    assert result.returncode == 0 and result.stdout.endswith("\n"), result.stderr[-6000:]
    assert len(result.stderr.splitlines()) <= 5, result.stderr

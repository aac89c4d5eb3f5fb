"""The command line, run in-process through ``main(argv)`` and as a subprocess.

Every bad input is one line ``kvsieve: error: <problem>; <fix>`` on stderr with exit code 2 and no traceback, found
before any model loads; output piped to a file or another program carries every value in full.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from kvsieve import models
from kvsieve.cli import main
from kvsieve.methods import list_methods
from tiny_model_dir import save_tiny_model_dir

SRC = Path(__file__).resolve().parents[1] / "src"


def run(argv: list[str]) -> int:
    """``main(argv)``'s exit code, also when argparse exits (``--help``, usage errors)."""
    try:
        return main(argv)
    except SystemExit as done:
        return int(done.code or 0)


def one_line_error(err: str, *fragments: str) -> str:
    """The single ``kvsieve: error: <problem>; <fix>`` line of ``err``; fails on anything else."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("kvsieve: error: ") and ";" in line, line
    for fragment in fragments:
        assert fragment in line, line
    return line


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m kvsieve.cli ARGS`` in a fresh interpreter; stdout and stderr are pipes, not terminals."""
    full_env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "kvsieve.cli", *args], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=300
    )


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def no_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a model fails the test: the error must come before."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(models, "load_model", refuse)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    out = {
        "binary": tmp_path / "blob.bin",
        "nul": tmp_path / "nul.txt",
        "empty": tmp_path / "empty.txt",
        "blank": tmp_path / "blank.txt",
        "dir": tmp_path / "a-directory",
        "missing": tmp_path / "missing.txt",
    }
    out["binary"].write_bytes(bytes([0x89, 0x50, 0x4E, 0x47, 0xF4, 0xFF, 0x00, 0x10]) * 16)
    out["nul"].write_bytes(b"w1 w2\x00\x01 w3")
    out["empty"].write_bytes(b"")
    out["blank"].write_text(" \n\t\n")
    out["dir"].mkdir()
    return out


# --- generate: every bad argument is refused before the model loads ----------------------------------------------


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--prompt-file", "{binary}"], ["--prompt-file", "not UTF-8 text"]),
        (["--prompt-file", "{nul}"], ["NUL bytes"]),
        (["--prompt-file", "{dir}"], ["is a directory"]),
        (["--prompt-file", "{empty}"], ["is empty"]),
        (["--prompt-file", "{blank}"], ["is empty"]),
        (["--prompt-file", "{missing}"], ["does not exist"]),
        (["--prompt", ""], ["prompt is empty"]),
        (["--prompt", "  \n\t "], ["prompt is empty"]),
        (["--prompt", "w1", "--max-new-tokens", "-1"], ["--max-new-tokens", "at least 1"]),
        (["--prompt", "w1", "--max-new-tokens", "0"], ["--max-new-tokens", "at least 1"]),
        (["--prompt", "w1", "--max-new-tokens", "many"], ["--max-new-tokens"]),
        (["--prompt", "w1", "--chunk-size", "0"], ["--chunk-size", "at least 1"]),
        (["--prompt", "w1", "--method", "snapkv", "--compression", "1.5"], ["outside [0, 1)"]),
        (["--prompt", "w1", "--method", "snapkv", "--compression", "0.5", "--interval", "4"], ["interval", "budget"]),
        (["--prompt", "w1", "--method", "snapkv", "--budget", "64", "--interval", "0"], ["--interval", "at least 1"]),
        (["--prompt", "w1", "--prefill", "snapkv"], ["not a prefill method"]),
        ([], ["--prompt"]),
    ],
)
def test_generate_refuses_bad_input_before_loading_the_model(args, fragments, files, no_model_loads, capsys):
    argv = ["generate", *[a.format(**files) for a in args]]
    assert run(argv) == 2
    one_line_error(capsys.readouterr().err, *fragments)


def test_generate_help_shows_the_defaults(capsys):
    assert run(["generate", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help text
    assert "(default: full)" in text  # --method
    assert "(default: 64)" in text  # --max-new-tokens
    assert "(default: smollm2-135m)" in text  # --model


# --- model directories and hub ids ------------------------------------------------------------------------------


def _broken_copy(tiny_dir: Path, tmp_path: Path, kind: str) -> Path:
    target = tmp_path / kind
    target.mkdir()
    for item in tiny_dir.iterdir():
        (target / item.name).write_bytes(item.read_bytes())
    if kind == "corrupt-config":
        (target / "config.json").write_text('{"model_type": "llama", ')
    elif kind == "unknown-model-type":
        config = json.loads((target / "config.json").read_text())
        (target / "config.json").write_text(json.dumps({**config, "model_type": "no_such_architecture"}))
    elif kind == "no-tokenizer":
        for item in target.iterdir():
            if item.name.startswith(("tokenizer", "chat_template")):
                item.unlink()
    elif kind == "no-config":
        (target / "config.json").unlink()
    return target


@pytest.mark.parametrize(
    ("kind", "fragments"),
    [
        ("corrupt-config", ["config.json", "not valid JSON"]),
        ("unknown-model-type", ["no_such_architecture", "does not know"]),
        ("no-tokenizer", ["no tokenizer files"]),
        ("no-config", ["no config.json"]),
    ],
)
def test_broken_model_directory_is_one_line(kind, fragments, tiny_dir, tmp_path, monkeypatch, capsys):
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("transformers was asked to load the model")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    broken = _broken_copy(tiny_dir, tmp_path, kind)
    assert run(["generate", "--model", str(broken), "--prompt", "w1"]) == 2
    one_line_error(capsys.readouterr().err, *fragments)


class _NetworkLog:
    """Replaces name resolution and connects: records every attempt and fails it as an unreachable network does."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.attempts: list[str] = []
        monkeypatch.setattr(socket, "getaddrinfo", self.getaddrinfo)
        monkeypatch.setattr(models, "_probe_memo", {})

    def getaddrinfo(self, host, *args, **kwargs):
        self.attempts.append(str(host))
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


def test_hub_id_with_hf_hub_offline_fails_at_once_without_the_network(monkeypatch, capsys):
    from huggingface_hub import constants

    network = _NetworkLog(monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as huggingface_hub reads it in a process started so
    assert run(["generate", "--model", "kvsieve-tests/no-such-model", "--prompt", "w1"]) == 2
    one_line_error(capsys.readouterr().err, "kvsieve-tests/no-such-model", "HF_HUB_OFFLINE", "smollm2-135m")
    assert network.attempts == []


def test_unreachable_hub_is_probed_once_not_retried(monkeypatch, capsys):
    """Without a network, one probe decides; transformers' minute of retries never starts."""
    from huggingface_hub import constants

    network = _NetworkLog(monkeypatch)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # huggingface_hub looks up its agent registry once per process for its user-agent header (3 s timeout); that is
    # its own request, not a download retry, so it is switched off here to count kvsieve's and transformers' only.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    assert run(["generate", "--model", "kvsieve-tests/no-such-model", "--prompt", "w1"]) == 2
    one_line_error(capsys.readouterr().err, "unreachable", "huggingface.co", "smollm2-135m")
    assert network.attempts == ["huggingface.co"]


# --- output for pipes, progress, JSON ------------------------------------------------------------------------------


def test_methods_piped_prints_every_name_and_paper_in_full(capsys):
    assert run(["methods"]) == 0
    out = capsys.readouterr().out
    for cls in list_methods():
        assert re.search(rf"\b{re.escape(cls.name)}\b", out), cls.name
        if cls.paper:
            assert cls.paper in out, cls.paper
    assert "…" not in out  # rich's ellipsis for a cut cell


def test_methods_json_one_object_per_method(capsys):
    assert run(["methods", "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["name"] for r in records] == [cls.name for cls in list_methods()]
    for record in records:
        assert {"name", "family", "paper", "needs", "kind", "simplifications", "fields"} <= set(record)
        assert isinstance(record["kind"], str) and record["kind"]
        assert isinstance(record["fields"], dict)
    by_name = {r["name"]: r for r in records}
    assert by_name["snapkv"]["fields"]["window"] == 32 and by_name["snapkv"]["paper"].endswith("arXiv:2404.14469")
    assert by_name["snapkv"]["kind"] == "evict" and by_name["full"]["kind"] == "keep-all"
    assert by_name["streaming_llm"]["positions"] == "in cache (re-rotated)"


def test_methods_as_a_pipe_in_a_subprocess():
    done = run_cli("methods")
    assert done.returncode == 0, done.stderr
    assert "recycled_attention" in done.stdout and "arXiv:2407.15891" in done.stdout


def test_generate_prints_progress_on_stderr_when_not_a_terminal(tiny_dir):
    done = run_cli("generate", "--model", str(tiny_dir), "--prompt", "w1 w2 w3 w4", "--max-new-tokens", "2", "--json")
    assert done.returncode == 0, done.stderr
    assert re.search(r"^kvsieve: prefilling [\d,]+ tokens", done.stderr, re.MULTILINE), done.stderr
    result = json.loads(done.stdout)
    assert result["prompt_tokens"] >= 4 and len(result["new_token_ids"]) <= 2


def test_bad_input_in_a_subprocess_is_one_line_without_traceback(files):
    done = run_cli("generate", "--prompt-file", str(files["binary"]))
    assert done.returncode == 2
    one_line_error(done.stderr, "not UTF-8 text")
    done = run_cli("generate", "--prompt", "w1", "--max-new-tokens", "-1")
    assert done.returncode == 2
    one_line_error(done.stderr, "--max-new-tokens")


def test_help_imports_neither_torch_nor_transformers():
    """`kvsieve --help` prints at once: heavy modules load inside the subcommand that needs them."""
    code = (
        "import sys\n"
        "from kvsieve.cli import main\n"
        "for argv in (['--help'], ['generate', '--help'], ['diagnose', '--help'], ['bench', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'kvsieve.models', 'kvsieve.bench.runner') if m in sys.modules]\n"
        "print('HEAVY', heavy, file=sys.stderr)\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stderr, done.stderr.splitlines()[-1]


def test_keyboard_interrupt_is_one_line_and_exit_code_130(monkeypatch, capsys):
    from kvsieve import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "methods", interrupted)
    try:
        code = run(["methods"])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped main() as a traceback")
    assert code == 130
    assert capsys.readouterr().err.strip() == "kvsieve: interrupted"


# --- diagnose: arguments checked before the model loads; full tables in pipes -------------------------------------


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--heads", "99.99"], ["head 99.99 does not exist", "2 layers x 4 query heads"]),
        (["--heads", "1.3,2.0,0.9"], ["heads 2.0, 0.9 do not exist"]),
        (["--text-file", "{binary}"], ["--text-file", "not UTF-8 text"]),
        (["--text-file", "{dir}"], ["is a directory"]),
        (["--text-file", "{empty}"], ["is empty"]),
        (["--length", "5000"], ["--length 5000", "window of 4096"]),
        (["--out", "{nul}"], ["--out", "is a file"]),
        (["--samples", "0", "--task", "niah_single_number"], ["--samples", "at least 1"]),
        (["--first-k", "0"], ["--first-k"]),
        (["--query-start", "-1"], ["--query-start"]),
    ],
)
def test_diagnose_refuses_bad_input_before_loading_the_model(
    args, fragments, files, tiny_dir, tmp_path, no_model_loads, capsys
):
    argv = ["diagnose", "--model", str(tiny_dir), "--out", str(tmp_path / "out"), *[a.format(**files) for a in args]]
    assert run(argv) == 2
    one_line_error(capsys.readouterr().err, *fragments)


def test_diagnose_piped_table_keeps_full_headers(tiny_dir, tmp_path, capsys):
    assert run(["diagnose", "--model", str(tiny_dir), "--length", "40", "--out", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "layer" in line and "token 0" in line)
    for title in ("first 4", "hidden sinks", "last 16", "entropy (norm)", "top 10%", "dormant", "max |h|"):
        assert title in header, header
    assert (tmp_path / "d" / "diagnosis.json").is_file()

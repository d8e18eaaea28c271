"""Run files: one HDF5 file per run, written through xarray and readable with h5py.

Every run file carries its provenance as attributes: the spec as JSON and its hash,
the model reference and the sha256 of its weights, the package versions and the
mechme version. A file is written to a temporary name in the same folder and renamed
into place, so a reader finds a complete file or none. A file is named by its spec
hash, and `write_run` never replaces a file whose stored hash differs.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
import xarray as xr

from mechme.errors import StoreError

ENGINE = "h5netcdf"
ATTR_PREFIX = "mechme_"


def spec_hash(spec: dict) -> str:
    """Return the sha256 of a spec's canonical JSON (sorted keys, no spaces)."""
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def package_versions() -> dict[str, str]:
    import importlib.metadata

    versions = {"python": platform.python_version()}
    for name in ("torch", "transformers", "nnsight", "h5py", "xarray", "numpy"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def provenance(kind: str, spec: dict, model_info: dict) -> dict[str, str]:
    from mechme import __version__

    return {
        f"{ATTR_PREFIX}kind": kind,
        f"{ATTR_PREFIX}spec": json.dumps(spec, sort_keys=True, default=str),
        f"{ATTR_PREFIX}spec_hash": spec_hash(spec),
        f"{ATTR_PREFIX}model": model_info.get("model", ""),
        f"{ATTR_PREFIX}weights_sha256": model_info.get("weights_sha256", ""),
        f"{ATTR_PREFIX}model_info": json.dumps(model_info, sort_keys=True),
        f"{ATTR_PREFIX}versions": json.dumps(package_versions(), sort_keys=True),
        f"{ATTR_PREFIX}version": __version__,
    }


def check_writable(folder: str | Path) -> Path:
    """Create ``folder`` if needed and check that files can be written in it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".mechme-probe-"):
            pass
    except OSError as err:
        raise StoreError(
            f"output folder {str(folder)!r} is not writable ({err.strerror}); pass a writable folder with --out"
        ) from err
    return folder


def write_run(ds: xr.Dataset, path: str | Path, *, kind: str, spec: dict, model_info: dict) -> Path:
    """Write ``ds`` with provenance to ``path`` atomically and return the path.

    Raises:
        StoreError: ``path`` exists and holds a run with a different spec hash.
    """
    path = Path(path)
    new_hash = spec_hash(spec)
    if path.exists():
        old = stored_hash(path)
        if old != new_hash:
            raise StoreError(
                f"{path} holds a run with spec hash {old!r}, not {new_hash!r}; "
                "it is never overwritten, so choose another output folder or delete it"
            )
    ds = ds.copy()
    ds.attrs.update(provenance(kind, spec, model_info))
    check_writable(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        ds.to_netcdf(tmp, engine=ENGINE, invalid_netcdf=True)
        _default_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _default_mode(path: str | Path) -> None:
    """Give a file made by mkstemp (mode 0600) the mode a plain open() would give it."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def stored_hash(path: str | Path) -> str | None:
    import h5py

    try:
        with h5py.File(path, "r") as fh:
            value = fh.attrs.get(f"{ATTR_PREFIX}spec_hash")
    except OSError as err:
        raise StoreError(f"{path} is not a readable HDF5 run file ({err}); delete it or pass another path") from err
    if isinstance(value, bytes):
        value = value.decode()
    return value


def open_run(path: str | Path, *, load: bool = True) -> xr.Dataset:
    """Open a run file as an ``xarray.Dataset`` (loaded into memory unless ``load=False``)."""
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"run file {str(path)!r} not found")
    try:
        ds = xr.open_dataset(path, engine=ENGINE)
        if load:
            ds = ds.load()
            ds.close()
    except (OSError, ValueError) as err:
        raise StoreError(f"{path} is corrupt or not a mechme run file ({err}); delete it and rerun") from err
    if f"{ATTR_PREFIX}spec_hash" not in ds.attrs:
        raise StoreError(f"{path} has no mechme provenance attributes, so it is not a mechme run file")
    return ds


def run_spec(ds: xr.Dataset) -> dict:
    return json.loads(ds.attrs[f"{ATTR_PREFIX}spec"])


def save_partial(folder: Path, name: str, arrays: dict[str, np.ndarray]) -> None:
    """Save one finished unit of work (a batch) atomically, for resuming."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".npz")
    os.close(fd)
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, folder / f"{name}.npz")
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_partial(folder: Path, name: str) -> dict[str, np.ndarray] | None:
    path = folder / f"{name}.npz"
    if not path.is_file():
        return None
    try:
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError):
        # A damaged checkpoint is recomputed, never trusted.
        path.unlink(missing_ok=True)
        return None

"""Run files (HDF5 through xarray), provenance and resume."""

from mechme.store.runfile import open_run, run_spec, spec_hash, write_run

__all__ = ["open_run", "run_spec", "spec_hash", "write_run"]

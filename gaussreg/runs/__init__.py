"""One run: its spec, the manifest that makes specs, the store of run directories (the
contract between processes), the reader of a run's rows, the worker that trains one run, and
what the worker needs of its device and environment."""

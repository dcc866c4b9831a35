"""Shared test helpers: paths (the repository, fixtures, benchmarks), robustness (deadlines, file
tampering), triton_env (the interpreter's environment for kernel tests)."""

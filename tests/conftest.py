import os

# Parity and determinism are defined on the CPU in float32; keep tests off any accelerator.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true")

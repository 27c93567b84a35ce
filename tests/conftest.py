import atexit
import os
import shutil
import signal
import tempfile

# Parity and determinism are defined on the CPU in float32; keep tests off any accelerator.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true")

# The trainers' caches (train/cache.py) go to a folder of this test session, not the user's
# ~/.cache; the trainer subprocesses inherit it, and it goes when the session ends.
if "VIT_CACHE_DIR" not in os.environ:
    os.environ["VIT_CACHE_DIR"] = tempfile.mkdtemp(prefix="vit-test-cache-")
    atexit.register(shutil.rmtree, os.environ["VIT_CACHE_DIR"], True)

# The tests' own programs go to that cache too: a train step that several tests compile alike
# (and the pytest-xdist workers each) is compiled once.
from train import cache  # noqa: E402

cache.use_jax_compilation_cache()

# Ctrl-C reaches the trainers the tests interrupt as it does at a terminal, even where this run
# was started with SIGINT ignored (`nohup ... &` does that, and children inherit an ignored
# signal across exec, whereas a handled one is reset to the default there).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

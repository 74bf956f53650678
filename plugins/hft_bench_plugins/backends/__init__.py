"""Built-in generation backends."""

from harmbench_ft import hookimpl
from hft_bench_plugins.backends.hf import HFBackend


@hookimpl
def hft_register_backends(register):
    register(HFBackend)

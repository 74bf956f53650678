"""Built-in generation backends: `hf` (default, transformers) and `vllm` (GPU, imported only when used)."""

from harmbench_ft import hookimpl
from hft_bench_plugins.backends.hf import HFBackend
from hft_bench_plugins.backends.vllm import VLLMBackend


@hookimpl
def hft_register_backends(register):
    register(HFBackend)
    register(VLLMBackend)

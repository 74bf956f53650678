"""Built-in grid executors: `local` (one run at a time, each in its own process) and `ray`."""

from harmbench_ft import hookimpl
from hft_bench_plugins.executors.local import LocalExecutor
from hft_bench_plugins.executors.ray_executor import RayExecutor


@hookimpl
def hft_register_executors(register):
    register(LocalExecutor)
    register(RayExecutor)

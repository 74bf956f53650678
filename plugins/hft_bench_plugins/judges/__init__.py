"""Built-in judges."""

from harmbench_ft import hookimpl
from hft_bench_plugins.judges.keyword import KeywordJudge


@hookimpl
def hft_register_judges(register):
    register(KeywordJudge)

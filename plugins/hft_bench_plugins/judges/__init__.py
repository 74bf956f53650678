"""Built-in judges. `pair-clf` (the cpu preset's headline), `keyword` and `harm-clf` run offline on a CPU; the model judges load on first use."""

from harmbench_ft import hookimpl
from hft_bench_plugins.judges.beaver_dam import BeaverDamJudge
from hft_bench_plugins.judges.harm_clf import HarmClfJudge, KeywordHarmClfJudge
from hft_bench_plugins.judges.keyword import KeywordJudge
from hft_bench_plugins.judges.llama_guard import LlamaGuard8BJudge, LlamaGuardJudge
from hft_bench_plugins.judges.pair_clf import PairClfJudge


@hookimpl
def hft_register_judges(register):
    for judge in (PairClfJudge, KeywordJudge, HarmClfJudge, KeywordHarmClfJudge, BeaverDamJudge, LlamaGuardJudge, LlamaGuard8BJudge):
        register(judge)

"""The `local` executor: the grid's runs one after the other, each in a process of its own.

A process per run means a crash (segfault, out-of-memory kill, a leaked CUDA context) ends that run
only: it is recorded as failed and the next run starts in a fresh process. The processes are forked
from a fork server that imported torch, transformers and peft once (and never computes anything), so a
run starts in a fraction of a second instead of re-importing them.

The executor claims a run (holds its lock) before starting its process, and takes first the runs that
no other grid on the same runs directory is working on, so two grids started together share the work.
"""

from __future__ import annotations

import multiprocessing
import sys

from harmbench_ft import Executor, GridRun, Outcome

WAITING = {"event": "waiting", "reason": "another grid is working on this run"}
PRELOAD = ["harmbench_ft.runner", "peft", "transformers.models.llama.modeling_llama"]  # what every run imports


def work(job: dict, events, lifeline) -> None:
    """The body of a run's process (forked by the fork server): events go back through a pipe."""
    sys.exit(Executor.worker(job, events.send, lifeline))


class LocalExecutor(Executor):
    name = "local"
    description = "sequential, in this machine; each run in its own process"

    def run_all(self, runs: list[GridRun], report) -> list[Outcome]:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        pending, outcomes = list(runs), []
        while pending:
            run = self.first_unclaimed(pending) or pending[0]  # all taken elsewhere: wait for the first
            pending.remove(run)
            report.run_started(run)
            with self.claim(run, wait=lambda: report.run_event(run, WAITING)):
                outcome = self.already_finished(run) or self.run_in_process(context, run, report)  # another grid may have finished it
            report.run_ended(run, outcome)
            outcomes.append(outcome)
        return outcomes

    def first_unclaimed(self, pending: list[GridRun]) -> GridRun | None:
        """The first run that no other process holds; the grid order is kept otherwise."""
        for run in pending:
            try:
                with self.claim(run):
                    return run
            except self.Busy:
                continue
        return None

    def run_in_process(self, context, run: GridRun, report) -> Outcome:
        receiver, sender = context.Pipe(duplex=False)
        lifeline, held = context.Pipe(duplex=False)  # we hold `held`: when this process dies, the run's process exits
        process = context.Process(target=work, args=(run.job(claimed=True), sender, lifeline), name=f"hft-bench run {run.index}")
        process.start()
        sender.close()  # the child holds the only writer now: its death ends the stream
        lifeline.close()
        outcome = None
        while True:
            try:
                event = receiver.recv()
            except EOFError:
                break
            if event.get("event") == "outcome":
                outcome = Outcome.from_event(event)
            else:
                report.run_event(run, event)
        process.join()
        receiver.close()
        held.close()
        if outcome is None:
            outcome = self.record_failure(run, f"the run's process {self.describe_exit(process.exitcode)} before reporting an outcome")
        return outcome

"""The `ray` executor: each run a Ray task with the grid's [resources], locally or on a cluster.

Runs sharing an artifact never race to build it: a run is submitted only after the runs in its
``waits_for`` (the grid's first user of each artifact it needs) have ended, so each alignment is built
once and then reused by the runs queued behind it. Each task runs in a fresh worker process
(``max_calls=1``), so a crash ends that run only, and is not retried (``max_retries=0``): a failed run is
recorded and the grid goes on. On a cluster, the runs directory (and the data mirror) must be on a
filesystem every node mounts at the same path; see docs/grids.md.
"""

from __future__ import annotations

import queue as queue_module

from harmbench_ft import Executor, GridRun, Outcome, UsageError

INSTALL_HINT = "pip install 'hft-bench[ray]'  (or: pip install 'ray[default]')"


def import_ray():
    try:
        import ray
    except ImportError:
        raise UsageError(f"the ray executor needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


def run_task(job: dict, index: int, events) -> Outcome:
    """The body of one Ray task: carry out the run here, sending its stage events to the driver."""
    return Executor.run_here(job, lambda event: events.put((index, event)))


class RayExecutor(Executor):
    name = "ray"
    description = "Ray tasks with the grid's [resources] (cpus, gpus); a local Ray or an existing cluster"
    option_help = {"address": "address of a running Ray cluster (hft-bench grid --ray-address); default: start a local Ray"}

    def run_all(self, runs: list[GridRun], report) -> list[Outcome]:
        ray = import_ray()
        from ray.util.queue import Queue

        started_here = not ray.is_initialized()
        if started_here:
            ray.init(address=self.options.get("address"), log_to_driver=False)  # run output goes to each run.log
        try:
            events = Queue()
            task = ray.remote(max_calls=1, max_retries=0)(run_task)
            by_index = {run.index: run for run in runs}
            waiting, in_flight, ended, outcomes = list(runs), {}, set(), []

            def submit_ready() -> None:
                for run in list(waiting):
                    if all(i in ended or i not in by_index for i in run.waits_for):
                        waiting.remove(run)
                        report.run_started(run)
                        options = {"num_cpus": run.resources.get("cpus", 1.0), "num_gpus": run.resources.get("gpus", 0.0)}
                        in_flight[task.options(**options).remote(run.job(), run.index, events)] = run

            submit_ready()
            while in_flight:
                done, _ = ray.wait(list(in_flight), num_returns=1, timeout=0.5)
                self._drain(events, by_index, report)
                for ref in done:
                    run = in_flight.pop(ref)
                    try:
                        outcome = ray.get(ref)
                    except Exception as exc:  # the worker died (segfault, OOM) or Ray lost it
                        outcome = self.record_failure(run, f"the Ray task failed: {type(exc).__name__}: {exc}")
                    ended.add(run.index)
                    report.run_ended(run, outcome)
                    outcomes.append(outcome)
                submit_ready()
            self._drain(events, by_index, report)
            return outcomes
        finally:
            if started_here:
                ray.shutdown()

    @staticmethod
    def _drain(events, by_index: dict[int, GridRun], report) -> None:
        while True:
            try:
                index, event = events.get_nowait()
            except queue_module.Empty:
                return
            report.run_event(by_index[index], event)

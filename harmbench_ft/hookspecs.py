"""The whole plugin contract of hft-bench.

A plugin is a module (or object) with functions marked ``@hookimpl`` whose names are the hooks
below, exposed through the ``hft_bench`` entry-point group::

    [project.entry-points.hft_bench]
    my-defense = "my_package.my_module"

Registration hooks receive a ``register`` callback; the host owns the lifecycle of what is
registered. An implementation may accept fewer arguments than its spec, so hooks can grow.
Lifecycle hooks receive one frozen event dataclass each: they observe, they must not mutate.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:
    from harmbench_ft.events import RunEnd, RunStart, StageEnd, StageStart

PROJECT_NAME = "hft_bench"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


# -------------------------------------------------------------------------------------------------
# Registration hooks: called once, when the registry is first built.
# -------------------------------------------------------------------------------------------------


@hookspec
def hft_register_defenses(register: Callable) -> None:
    """Register defenses.

    Called once when the registry is built; every implementation is called.

    :param register: call ``register(DefenseClass)`` for each :class:`harmbench_ft.Defense`
        subclass; its ``name`` attribute is the name users pass to ``--defense``.
    """


@hookspec
def hft_register_tasks(register: Callable) -> None:
    """Register fine-tuning tasks (the benign data a user uploads, its test set and scorer).

    Called once when the registry is built; every implementation is called.

    :param register: call ``register(task)`` with a :class:`harmbench_ft.Task` instance.
    """


@hookspec
def hft_register_judges(register: Callable) -> None:
    """Register harmfulness judges.

    Called once when the registry is built; every implementation is called.

    :param register: call ``register(JudgeClass)`` with a :class:`harmbench_ft.Judge` subclass;
        it is instantiated only when a run uses it, so heavy judges cost nothing otherwise.
    """


@hookspec
def hft_register_backends(register: Callable) -> None:
    """Register generation backends.

    Called once when the registry is built; every implementation is called.

    :param register: call ``register(BackendClass)`` with a :class:`harmbench_ft.Backend` subclass.
    """


@hookspec
def hft_register_executors(register: Callable) -> None:
    """Register grid executors (how a list of runs is carried out).

    Called once when the registry is built; every implementation is called.

    :param register: call ``register(ExecutorClass)`` with a :class:`harmbench_ft.Executor` subclass.
    """


# -------------------------------------------------------------------------------------------------
# Lifecycle hooks: for loggers and trackers. Every implementation is called; results are ignored.
# -------------------------------------------------------------------------------------------------


@hookspec
def hft_run_start(event: RunStart) -> None:
    """Called when a run starts, before any stage.

    :param event: the run id, its directory and its resolved spec.
    """


@hookspec
def hft_run_end(event: RunEnd) -> None:
    """Called when a run ends, finished or failed.

    :param event: the run id, its status, its metrics (empty on failure) and the error if any.
    """


@hookspec
def hft_stage_start(event: StageStart) -> None:
    """Called when a stage (alignment, finetune, post_finetune, evaluation) starts.

    :param event: the run id and the stage name.
    """


@hookspec
def hft_stage_end(event: StageEnd) -> None:
    """Called when a stage ends.

    :param event: the run id, the stage name, its seconds and whether its artifact was reused.
    """

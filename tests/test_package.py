"""The package namespace: every public name resolves, lazily, and the worker's start-up
path does not import the client (nor the parts of dask only the client needs)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import Any

import trioscheduler


def _run(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


def test_every_public_name_resolves_and_is_listed() -> None:
    for name in trioscheduler.__all__:
        assert getattr(trioscheduler, name) is not None, name
    assert set(trioscheduler.__all__) <= set(dir(trioscheduler))


def test_unknown_name_is_an_attribute_error() -> None:
    try:
        trioscheduler.no_such_name  # type: ignore[attr-defined]  # noqa: B018
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:
        raise AssertionError("expected AttributeError")


def test_submodule_does_not_hide_the_function_of_the_same_name() -> None:
    out = _run(
        """
        import inspect
        import trioscheduler.progress, trioscheduler.worker_client
        from trioscheduler import progress, worker_client
        print(inspect.isfunction(progress), inspect.isfunction(worker_client))
        """
    )
    assert out == "True True"


def test_import_is_light() -> None:
    out = _run(
        """
        import sys
        import trioscheduler
        print(sorted(m for m in ("dask", "trioscheduler.client.client", "trio") if m in sys.modules))
        """
    )
    assert out == "[]"


def test_worker_start_up_path_does_not_import_the_client() -> None:
    out = _run(
        """
        import sys
        import trioscheduler.cli.main, trioscheduler.server.nanny, trioscheduler.server.worker
        heavy = ("trioscheduler.client.client", "trioscheduler.client.collections", "trioscheduler.server.scheduler",
                 "dask.dataframe", "dask.array", "pandas", "numpy", "tqdm")
        print(sorted(m for m in heavy if m in sys.modules))
        """
    )
    assert out == "[]"


def test_old_module_paths_still_import_the_same_objects() -> None:
    """Modules moved into subpackages (issue 11): a user's old imports keep working."""
    out = _run(
        """
        import trioscheduler
        from trioscheduler.scheduler import Scheduler
        from trioscheduler.worker import Worker
        from trioscheduler.nanny import Nanny
        from trioscheduler.cluster import LocalCluster
        from trioscheduler.futures import Future
        from trioscheduler.datasets import DatasetExistsError
        from trioscheduler.execute import Reschedule
        from trioscheduler.client import Client
        import trioscheduler.worker as old_worker
        print(
            Scheduler is trioscheduler.Scheduler, Worker is trioscheduler.Worker,
            Nanny is trioscheduler.Nanny, LocalCluster is trioscheduler.LocalCluster,
            Future is trioscheduler.Future, Client is trioscheduler.Client,
            DatasetExistsError is trioscheduler.DatasetExistsError,
            Reschedule is trioscheduler.Reschedule,
            old_worker.Worker is Worker, trioscheduler.scheduler.Scheduler is Scheduler,
        )
        """
    )
    assert out == " ".join(["True"] * 10)


def test_an_old_module_path_forwards_monkeypatching(monkeypatch: Any) -> None:
    import trioscheduler.memory as old

    from trioscheduler.server import memory

    monkeypatch.setattr(old, "_PATCHED_FOR_TEST", 1, raising=False)
    assert memory._PATCHED_FOR_TEST == 1  # type: ignore[attr-defined]

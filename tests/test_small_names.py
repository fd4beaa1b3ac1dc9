"""``Status``, ``config``, ``get_task_metadata`` and ``span`` as dask users import them."""

from __future__ import annotations

import dask
import pytest

import trioscheduler
from trioscheduler import Client, LocalCluster, Status, get_task_metadata, span


def _fails(x: int) -> int:
    raise ValueError(x)


def test_status_compares_with_our_status_strings() -> None:
    with LocalCluster(1, 1, processes=False) as cluster:
        (worker,) = cluster.workers.values()
        assert worker.status == Status.running
        assert cluster.status == Status.running
    assert cluster.status == Status.closed
    assert str(Status.running) == "Status.running"
    assert Status("paused") is Status.paused


def test_config_is_dask_config() -> None:
    assert trioscheduler.config is dask.config.config  # as distributed.config
    with dask.config.set({"trioscheduler-test.value": 3}):
        assert trioscheduler.config["trioscheduler-test"]["value"] == 3


def test_get_task_metadata_collects_final_states() -> None:
    with LocalCluster(1, 2, processes=False) as cluster, Client(cluster) as client:
        before = client.submit(sum, [1], key="before")
        before.result()
        with get_task_metadata() as tasks:
            good = client.submit(sum, [1, 2], key="good")
            bad = client.submit(_fails, 1, key="bad")
            assert good.result() == 3
            with pytest.raises(ValueError):
                bad.result()
        assert tasks.state == {"good": "memory", "bad": "erred"}
        assert tasks.metadata == {"good": {}, "bad": {}}
        # the collecting plugin is gone afterwards
        assert not [n for n in client.run_on_scheduler(_plugin_names) if n.startswith("task-metadata")]


def _plugin_names(dask_scheduler: object = None) -> list[str]:
    return list(dask_scheduler.plugins.plugins)  # type: ignore[attr-defined]


def test_span_nests_and_yields_ids() -> None:
    with span("workflow") as outer:
        assert dask.get_annotations()["span"]["name"] == ("workflow",)
        with span("step", "inner") as inner:
            annotation = dask.get_annotations()["span"]
            assert annotation["name"] == ("workflow", "step", "inner")
            assert annotation["ids"][0] == outer and annotation["ids"][-1] == inner
        with LocalCluster(1, 1, processes=False) as cluster, Client(cluster) as client:
            assert client.submit(sum, [2, 3], key="in-span").result() == 5
    assert "span" not in dask.get_annotations()
    assert outer != inner
    with pytest.raises(ValueError, match="at least one span tag"), span():
        pass

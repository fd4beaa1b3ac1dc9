"""``get_task_metadata`` and ``span``: dask's context managers around submitted work.

``get_task_metadata`` registers a scheduler plugin (``plugins.base.CollectTaskMetadata``)
for the length of the block and takes back what it saw: each task's final state. Our
tasks carry no metadata of their own yet, so ``metadata`` maps each key to ``{}``.

``span`` tags work with a name, nestable, and yields the span's id, as dask's (through
dask's annotations, so ``dask.get_annotations()["span"]`` shows it inside the block);
our scheduler keeps no per-span accounting yet.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from typing import Any

from dask.base import annotate, get_annotations

from trioscheduler.client.base import default_client
from trioscheduler.plugins.base import CollectTaskMetadata

__all__ = ["get_task_metadata", "span"]


async def _collected(name: str, dask_scheduler: Any = None) -> dict[str, Any]:
    plugin = dask_scheduler.plugins.plugins.get(name)
    if plugin is None:
        raise ValueError(f"no task metadata is being collected under {name!r}")
    await dask_scheduler.plugins.remove(name)
    return {"metadata": plugin.metadata, "state": plugin.state}


class get_task_metadata:  # noqa: N801 - dask's name
    """``with get_task_metadata() as tasks: ...`` then ``tasks.state`` (``{key:
    "memory" | "erred"}``) and ``tasks.metadata`` of the tasks submitted in the block
    (also ``async with`` for an asynchronous client)."""

    def __init__(self) -> None:
        self.name = f"task-metadata-{uuid.uuid4().hex}"
        self.metadata: dict[Any, Any] | None = None
        self.state: dict[Any, str] | None = None

    def __enter__(self) -> get_task_metadata:
        default_client().register_plugin(CollectTaskMetadata(self.name))
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._keep(default_client().run_on_scheduler(_collected, self.name))

    async def __aenter__(self) -> get_task_metadata:
        await default_client().register_plugin(CollectTaskMetadata(self.name))
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        self._keep(await default_client().run_on_scheduler(_collected, self.name))

    def _keep(self, collected: dict[str, Any]) -> None:
        self.metadata = collected["metadata"]
        self.state = collected["state"]


@contextlib.contextmanager
def span(*tags: str) -> Iterator[str]:
    """Tag the work submitted in the block (nested spans extend the name); yields the id."""
    if not tags:
        raise ValueError("Must specify at least one span tag")
    outer = get_annotations().get("span")
    names = tuple(outer["name"]) if outer else ()
    ids = tuple(outer["ids"]) if outer else ()
    new_ids = tuple(str(uuid.uuid4()) for _ in tags)
    with annotate(span={"name": names + tags, "ids": ids + new_ids}):
        yield new_ids[-1]

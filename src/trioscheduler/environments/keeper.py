"""A nanny's side of shipped environments: which one its next worker starts in.

Before each start of a worker the nanny asks the scheduler for the current environment
(``env_current``), so a worker restarted after a crash, and the worker of a nanny that
joins later, start where the others run. ``prepare`` is the first phase of a restart
into an environment: fetch it (unless this host has it) straight into the extraction,
re-base it, run the preflight; the nanny answers the scheduler only after all of that,
and its worker keeps running meanwhile.

The keeper leases (``cache.Lease``) every entry it prepared until a worker has started
elsewhere, so the host's eviction, run after each new entry, never removes an
environment a worker of this nanny runs in or is about to.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from trioscheduler import wire
from trioscheduler.environments import cache, evict, transfer
from trioscheduler.environments import manifest as mf
from trioscheduler.environments.extract import safe_extract
from trioscheduler.environments.launch import (
    LaunchSpec,
    preflight,
    preflight_done,
    prepare_launch,
)

logger = logging.getLogger("trioscheduler.environments")

BASE = "base"


class EnvironmentKeeper:
    """Environments of one nanny; ``cache_root`` is shared by the user's nannies on a host.

    ``python``: the interpreter venvs are re-based onto (None: the nanny's own base
    interpreter); ``limits``: the host cache's bounds, applied after each new entry.
    """

    def __init__(
        self,
        scheduler_address: str,
        cache_root: str | os.PathLike[str] | None = None,
        connect_args: dict[str, Any] | None = None,
        *,
        python: str | None = None,
        limits: evict.Limits | None = None,
    ) -> None:
        self.scheduler_address = scheduler_address
        self.connect_args = dict(connect_args or {})  # TLS: the nanny's certificate
        self.cache_root = Path(cache_root) if cache_root is not None else cache.default_cache_dir()
        self.python = python
        self.limits = limits if limits is not None else evict.Limits.resolve()
        self.current: str | None = None  # the environment of the running worker; None: base
        self._specs: dict[str, LaunchSpec] = {}
        self._leases: dict[str, cache.Lease] = {}
        self._base: str | None = None  # rebase_onto(), once
        self._base_spec: LaunchSpec | None = None  # base_spec(), once
        self._lock = trio.Lock()

    async def scheduler_choice(self) -> str | None:
        """The scheduler's current environment; if it cannot say, the one we run in."""
        try:
            with trio.fail_after(10):
                stream = await wire.connect(
                    self.scheduler_address, timeout=5, role="nanny", **self.connect_args
                )
                async with stream:
                    await stream.send({"op": "env_current"})
                    reply = await stream.receive()
        except (OSError, trio.TooSlowError, trio.BrokenResourceError, trio.EndOfChannel) as exc:
            logger.debug("nanny: could not ask the scheduler for its environment: %r", exc)
            return self.current
        if not isinstance(reply, dict) or reply.get("status") != "OK":
            return self.current  # a scheduler without environments
        choice = reply.get("result")
        return cache.check_id(choice) if choice is not None else None

    async def prepare(
        self, env_id: str | None, *, cwd: str, base_env: Mapping[str, str]
    ) -> LaunchSpec | None:
        """Have environment ``env_id`` ready to start a worker in (None: the base one)."""
        if env_id is None or env_id == BASE:
            return None
        cache.check_id(env_id)
        async with self._lock:  # one fetch per nanny; other nannies wait on the host lock
            spec = self._specs.get(env_id)
            if spec is not None and env_id in self._leases:
                return spec
            t0 = time.monotonic()
            python = await self.rebase_onto()
            lease = await trio.to_thread.run_sync(cache.acquire, self.cache_root, env_id, python)
            made = False
            if lease is None or not preflight_done(lease.prefix):
                # Under the host lock: one nanny of the host fetches and extracts it and
                # runs the preflight; the others find both done.
                if lease is not None:
                    lease.release()
                async with _host_lock(self.cache_root, env_id):
                    lease = await trio.to_thread.run_sync(
                        cache.acquire, self.cache_root, env_id, python
                    )
                    if lease is None:
                        lease, made = await self._stream_build(env_id, python), True
                    spec = await self._preflight(env_id, lease, cwd, base_env)
            else:
                spec = await self._preflight(env_id, lease, cwd, base_env)
            logger.info(
                "environment %s ready in %.2f s%s",
                env_id[:12], time.monotonic() - t0, " (fetched and extracted here)" if made else "",
            )  # fmt: skip
            self._specs[env_id] = spec
        if made:
            # After, never before, the new entry: its extraction should not pay for the
            # deletions (inode allocation slows down right after many files were removed).
            await trio.to_thread.run_sync(evict.evict, self.cache_root, self.limits)
        return spec

    async def base_spec(self, *, cwd: str, base_env: Mapping[str, str]) -> LaunchSpec:
        """How to start a worker under ``python`` in the base environment; its preflight
        runs once (an interpreter without trioscheduler's dependencies fails here, the
        missing module named)."""
        if self._base_spec is None:
            assert self.python is not None
            python, root = self.python, self.cache_root
            self._base_spec = await trio.to_thread.run_sync(
                lambda: preflight(BASE, "", python, cwd=cwd, cache_root=root, base_env=base_env)
            )
        return self._base_spec

    async def rebase_onto(self) -> str | None:
        """The base interpreter of ``python`` (a venv's ``bin/python`` is a view on one,
        and a venv cannot be based on another venv); None: this process's."""
        if self.python is not None and self._base is None:
            facts = await trio.to_thread.run_sync(mf.describe_interpreter, self.python)
            self._base = str(facts.get("base_executable") or self.python)
        return self._base

    async def _preflight(
        self, env_id: str, lease: cache.Lease, cwd: str, base_env: Mapping[str, str]
    ) -> LaunchSpec:
        """The preflight; ``lease`` is kept if it passes, released if not."""
        root = self.cache_root
        try:
            spec = await trio.to_thread.run_sync(
                lambda: prepare_launch(
                    env_id, lease.prefix, cwd=cwd, cache_root=root, base_env=base_env
                )
            )
        except BaseException:
            lease.release()
            raise
        old = self._leases.pop(env_id, None)
        if old is not None and old is not lease:
            old.release()
        self._leases[env_id] = lease
        return spec

    def started(self, env_id: str | None) -> None:
        """A worker started in ``env_id`` (None: base): the other leases may go."""
        self.current = env_id
        for other in [e for e in self._leases if e != env_id]:
            self._leases.pop(other).release()
            self._specs.pop(other, None)

    def close(self) -> None:
        for lease in self._leases.values():
            lease.release()
        self._leases.clear()
        self._specs.clear()

    async def _stream_build(self, env_id: str, python: str | None) -> cache.Lease:
        """Fetch ``env_id`` straight into its extraction; the caller holds the host lock."""
        send, receive = trio.open_memory_channel[transfer.Chunk](4)

        async def next_chunk() -> transfer.Chunk:
            try:
                return await receive.receive()
            except trio.EndOfChannel:
                return b""

        reader = transfer.ChunkReader(lambda: trio.from_thread.run(next_chunk), env_id)

        def fill(tmp: Path) -> int:
            try:
                written = safe_extract(reader, tmp)
            except Exception:
                # Bytes corrupted on the way explain any extraction error (a zlib error,
                # a bad tar header): the sha256 check of the whole says so, if it fails.
                reader.finish()
                raise
            reader.finish()
            return written

        outcome: list[cache.Lease | Exception] = []

        async def build() -> None:
            try:
                outcome.append(
                    await trio.to_thread.run_sync(
                        lambda: cache.build(fill, env_id, self.cache_root, python=python)
                    )
                )
            except Exception as exc:
                outcome.append(exc)
            finally:
                receive.close()  # a fetch still sending stops

        t0 = time.monotonic()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: transfer.fetch(
                    self.scheduler_address, env_id, send, connect_args=self.connect_args
                )
            )
            nursery.start_soon(build)
        [result] = outcome
        if isinstance(result, Exception):
            raise result
        logger.info(
            "environment %s: fetched %.0f MB and extracted it in %.2f s",
            env_id[:12], reader.size / 2**20, time.monotonic() - t0,
        )  # fmt: skip
        return result


@asynccontextmanager
async def _host_lock(root: Path, env_id: str) -> AsyncIterator[None]:
    """``cache.host_lock`` for async code: waited for in a thread."""
    await trio.to_thread.run_sync(lambda: root.mkdir(parents=True, exist_ok=True, mode=0o700))
    fd = os.open(
        root / f".{cache.check_id(env_id)}.lock", os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600
    )
    try:
        await trio.to_thread.run_sync(fcntl.flock, fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock

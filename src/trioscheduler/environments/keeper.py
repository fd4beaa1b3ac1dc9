"""A nanny's side of shipped environments: which one its next worker starts in.

Before each start of a worker the nanny asks the scheduler for the current environment
(``env_current``), so a worker restarted after a crash, and the worker of a nanny that
joins later, start where the others run. ``prepare`` is the first phase of a restart
into an environment: fetch it (unless this host has it), materialize it, run the
preflight; the nanny answers the scheduler only after all of that, and its worker keeps
running meanwhile.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import trio

from trioscheduler import wire
from trioscheduler.environments import cache, transfer
from trioscheduler.environments.launch import LaunchSpec, prepare_launch

logger = logging.getLogger("trioscheduler.environments")

BASE = "base"


class EnvironmentKeeper:
    """Environments of one nanny; ``cache_root`` is shared by the user's nannies on a host."""

    def __init__(
        self,
        scheduler_address: str,
        cache_root: str | os.PathLike[str] | None = None,
        connect_args: dict[str, Any] | None = None,
    ) -> None:
        self.scheduler_address = scheduler_address
        self.connect_args = dict(connect_args or {})  # TLS: the nanny's certificate
        self.cache_root = Path(cache_root) if cache_root is not None else cache.default_cache_dir()
        self.current: str | None = None  # the environment of the running worker; None: base
        self._specs: dict[str, LaunchSpec] = {}
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
            if spec is not None and await trio.Path(spec.python).exists():
                return spec
            t0 = time.monotonic()
            prefix = cache.cached(self.cache_root, env_id)
            if prefix is None:
                prefix = await self._fetch_and_materialize(env_id)
            t1 = time.monotonic()
            spec = await trio.to_thread.run_sync(
                lambda: prepare_launch(
                    env_id, prefix, cwd=cwd, cache_root=self.cache_root, base_env=base_env
                )
            )
            logger.info(
                "environment %s ready in %.2f s (host cache %.2f s, preflight %.2f s)",
                env_id[:12], time.monotonic() - t0, t1 - t0, time.monotonic() - t1,
            )  # fmt: skip
            self._specs[env_id] = spec
            return spec

    async def _fetch_and_materialize(self, env_id: str) -> Path:
        root = self.cache_root
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(root / f".{env_id}.lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            import fcntl

            await trio.to_thread.run_sync(fcntl.flock, fd, fcntl.LOCK_EX)
            found = cache.cached(root, env_id)  # another nanny of this host made it
            if found is not None:
                return found
            t0 = time.monotonic()
            archive = await transfer.download(
                self.scheduler_address, env_id, root, connect_args=self.connect_args
            )
            t1 = time.monotonic()
            try:
                prefix = await trio.to_thread.run_sync(
                    lambda: cache.materialize_locked(archive, env_id, root, verify=False)
                )
                logger.info(
                    "environment %s: fetched %.0f MB in %.2f s, unpacked in %.2f s",
                    env_id[:12], archive.stat().st_size / 2**20, t1 - t0, time.monotonic() - t1,
                )  # fmt: skip
                return prefix
            finally:
                archive.unlink(missing_ok=True)
        finally:
            os.close(fd)

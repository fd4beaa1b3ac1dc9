"""The first phase of ``restart(environment=...)``: every nanny prepares, or nobody moves.

The scheduler asks each worker's nanny to ``env_prepare`` (fetch, materialize,
preflight) while the workers keep running. Only if every nanny answers OK does the
restart proper begin; otherwise ``EnvironmentRefusedError`` names each worker's reason
and the cluster stays in its old environment, no worker stopped.
"""

from __future__ import annotations

import trio

from trioscheduler import wire
from trioscheduler.environments.errors import EnvironmentRefusedError


async def prepare_everywhere(
    pool: wire.ConnectionPool,
    nannies: dict[str, str],
    plain: list[str],
    env_id: str,
    prepare_timeout: float,
) -> None:
    """Have ``nannies`` (worker -> nanny address) prepare ``env_id``; raise if any cannot."""
    reasons = {
        addr: "this worker has no nanny, so it cannot start again in another environment"
        for addr in plain
    }

    async def one(addr: str, nanny: str) -> None:
        try:
            with trio.fail_after(prepare_timeout):
                async with pool.connect(nanny) as stream:
                    await stream.send({"op": "env_prepare", "id": env_id})
                    reply = await stream.receive()
        except trio.TooSlowError:
            reasons[addr] = (
                f"its nanny did not prepare the environment within {prepare_timeout:.0f} s "
                "(restart's prepare_timeout)"
            )
            return
        except (OSError, trio.BrokenResourceError, trio.EndOfChannel) as exc:
            reasons[addr] = f"could not reach its nanny at {nanny}: {exc!r}"
            return
        if not isinstance(reply, dict) or reply.get("status") != "OK":
            text = reply.get("text") if isinstance(reply, dict) else repr(reply)
            reasons[addr] = str(text)

    async with trio.open_nursery() as nursery:
        for addr, nanny in nannies.items():
            nursery.start_soon(one, addr, nanny)
    if reasons:
        shown = "base" if env_id == "base" else env_id[:12]
        raise EnvironmentRefusedError(
            f"restart(environment={shown!r}) refused; every worker keeps running in its "
            "current environment:\n"
            + "\n".join(f"  {addr}: {why}" for addr, why in sorted(reasons.items())),
            reasons,
        )

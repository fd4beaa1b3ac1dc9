"""The user's side: ``%remote``/``%%remote``, ``%scheduler``, per-worker magics, qtconsole.

Runs in the user's IPython (terminal, notebook, ``ipython -c``) and talks to server
kernels with ``jupyter_client.BlockingKernelClient``, which must never run in a trio
task (it runs its own asyncio loop and would block the trio thread: A11).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any

from trioscheduler.errors import TrioSchedulerError

DEFAULT_TIMEOUT = 30.0
_clients: dict[tuple[Any, ...], Any] = {}  # connection info -> BlockingKernelClient


class RemoteKernelError(TrioSchedulerError):
    """A cell failed in a server's kernel (its traceback was printed) or got no answer."""


def user_shell() -> Any:
    """The user's IPython shell, or None: also None in a server process whose
    ``get_ipython()`` is the server's own kernel (A12), which must not get magics."""
    if "IPython" not in sys.modules:
        return None
    from IPython import get_ipython

    shell = get_ipython()
    if shell is None:
        return None
    from trioscheduler.kernels.service import _KERNEL

    handle = _KERNEL.handle
    if handle is not None and handle.app is not None and handle.app.kernel.shell is shell:
        return None
    return shell


def _client_for(info: dict[str, Any], timeout: float) -> Any:  # noqa: ASYNC109
    from jupyter_client.blocking.client import BlockingKernelClient

    key = tuple(sorted((k, str(v)) for k, v in info.items()))
    kc = _clients.get(key)
    if kc is None:
        kc = BlockingKernelClient()
        kc.load_connection_info(dict(info))  # type: ignore[arg-type]
        kc.start_channels()
        try:
            kc.wait_for_ready(timeout=timeout)
        except RuntimeError as exc:
            kc.stop_channels()
            raise RemoteKernelError(
                f"the kernel at {_where(info)} did not answer within {timeout} s ({exc}); "
                "if its server restarted, start the kernels again"
            ) from None
        _clients[key] = kc
    return key, kc


def _where(info: dict[str, Any]) -> str:
    return str(info.get("server_address") or f"{info.get('ip')}:{info.get('shell_port')}")


def close_clients() -> None:
    """Disconnect every cached kernel client (the kernels keep running)."""
    for kc in _clients.values():
        kc.stop_channels()
    _clients.clear()


def _show(data: dict[str, Any], metadata: dict[str, Any] | None) -> None:
    if user_shell() is not None:
        from IPython.display import publish_display_data

        publish_display_data(data, metadata)  # type: ignore[no-untyped-call]
    elif "text/plain" in data:
        print(data["text/plain"])


def run_cell_remote(info: dict[str, Any], code: str, timeout: float = DEFAULT_TIMEOUT) -> None:  # noqa: ASYNC109
    """Run ``code`` in the kernel of ``info``; show its output here. A remote error prints
    the remote traceback and raises ``RemoteKernelError``."""
    key, kc = _client_for(info, timeout)
    if info.get("role") == "worker" and info.get("server_address"):
        # several workers may share the kernel (one process): ``worker`` is the target
        bind = f"worker = workers[{info['server_address']!r}]"
        kc.execute(bind, silent=True, store_history=False)
    error: dict[str, Any] = {}

    def hook(msg: dict[str, Any]) -> None:
        kind, content = msg["header"]["msg_type"], msg["content"]
        if kind == "stream":
            stream = sys.stderr if content.get("name") == "stderr" else sys.stdout
            stream.write(content["text"])
        elif kind in ("execute_result", "display_data"):
            _show(content["data"], content.get("metadata"))
        elif kind == "error":
            error.update(content)

    try:
        reply = kc.execute_interactive(code, timeout=timeout, output_hook=hook, allow_stdin=False)
    except TimeoutError:
        _clients.pop(key, None)  # its server may have restarted (new ports, new key)
        kc.stop_channels()
        raise RemoteKernelError(
            f"no answer from the kernel at {_where(info)} within {timeout} s; it may still "
            "be running the cell (interrupt it with a kernel client), or its server is gone"
        ) from None
    content = reply["content"]
    if content.get("status") != "ok":
        failed = error or content
        print("\n".join(failed.get("traceback", [])), file=sys.stderr)
        raise RemoteKernelError(
            f"{failed.get('ename')}: {failed.get('evalue')} (in the kernel at {_where(info)})"
        )


def split_target(line: str) -> tuple[str, str]:
    """``"info['tcp://1.2.3.4:5'] worker.data"`` -> ``("info['tcp://1.2.3.4:5']",
    "worker.data")``: the target ends at whitespace outside brackets and quotes."""
    depth, quote = 0, ""
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch.isspace() and depth == 0:
            return line[:i], line[i:].strip()
    return line.strip(), ""


def remote(line: str, cell: str | None = None) -> None:
    """``%remote TARGET CODE`` / ``%%remote TARGET``: run CODE in a server's kernel.

    TARGET is an expression in your namespace that gives connection info, e.g.
    ``info['tcp://127.0.0.1:4595']`` for ``info = client.start_ipython_workers()``
    (a one-worker ``{address: info}`` works too)."""
    from IPython.core.error import UsageError

    shell = user_shell()
    target, rest = split_target(line.strip())
    if not target:
        raise UsageError("usage: %remote INFO CODE   or   %%remote INFO (code in the cell)")
    try:
        info = eval(target, shell.user_ns if shell is not None else {})
    except Exception as exc:
        raise UsageError(f"%remote: cannot evaluate {target!r}: {exc!r}") from None
    if isinstance(info, dict) and "shell_port" not in info and len(info) == 1:
        (info,) = info.values()
    if not isinstance(info, dict) or "shell_port" not in info:
        raise UsageError(f"%remote: {target!r} is not a kernel's connection info")
    code = cell if cell is not None else rest
    if not code.strip():
        raise UsageError("%remote: no code to run")
    run_cell_remote(info, code)


def register_remote_magic(name: str = "remote") -> bool:
    shell = user_shell()
    if shell is None:
        return False
    shell.register_magic_function(remote, magic_kind="line_cell", magic_name=name)
    return True


def register_kernel_magic(info: dict[str, Any], name: str) -> bool:
    """A magic with a fixed target: ``%scheduler CODE`` / ``%%scheduler``."""
    shell = user_shell()
    if shell is None:
        return False

    def magic(line: str, cell: str | None = None) -> None:
        run_cell_remote(info, cell if cell is not None else line)

    magic.__doc__ = f"Run code in the kernel of {_where(info)}."
    shell.register_magic_function(magic, magic_kind="line_cell", magic_name=name)
    return True


def expand_magic_names(magic_names: Any, n: int) -> list[str]:
    """dask's ``magic_names``: False, a name, ``'w_*'`` (w_0, w_1, ...) or a list."""
    if not magic_names:
        return []
    if isinstance(magic_names, str):
        if "*" in magic_names:
            return [magic_names.replace("*", str(i)) for i in range(n)]
        names = [magic_names]
    else:
        names = [str(x) for x in magic_names]
    if len(names) != n:
        raise ValueError(f"magic_names gives {len(names)} name(s) for {n} worker(s): {names}")
    return names


def write_connection_file(info: dict[str, Any], name: str) -> str:
    """The info as a private (0600) connection file, for ``jupyter console --existing``."""
    directory = tempfile.mkdtemp(prefix="trioscheduler-kernels-")
    path = os.path.join(directory, f"{name}.json")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(info, f)
    return path


def connect_qtconsole(info: dict[str, Any], name: str, extra_args: list[str] | None = None) -> Any:
    """Open a Jupyter qtconsole on the kernel (needs the ``qtconsole`` package)."""
    program = shutil.which("jupyter-qtconsole")
    if program is None:
        raise RuntimeError(
            "qtconsole=True needs the qtconsole package (pip install qtconsole); without "
            "it, connect a terminal console: jupyter console --existing FILE, with FILE "
            "from trioscheduler.kernels.magics.write_connection_file(info, name)"
        )
    path = write_connection_file(info, name)
    return subprocess.Popen([program, "--existing", path, *(extra_args or [])])


_ERRORS: dict[str, type[Exception]] = {
    "ImportError": ImportError,
    "RuntimeError": RuntimeError,
    "TimeoutError": TimeoutError,
    "OSError": OSError,
}


def info_from_reply(reply: Any, server: str) -> dict[str, Any]:
    """A server's ``start_ipython`` answer as connection info, or its error raised here
    as the same type (an ImportError names the extra the server lacks)."""
    if not isinstance(reply, dict) or ("info" not in reply and "error" not in reply):
        raise TrioSchedulerError(f"{server} gave no kernel: {reply!r:.300}")
    if "error" in reply:
        kind, text = reply["error"]
        raise _ERRORS.get(kind, TrioSchedulerError)(f"{server}: {text}")
    info = dict(reply["info"])
    if info.get("ip") in ("0.0.0.0", "::", ""):  # bound to every interface: the host we reach
        scheme, _, rest = server.partition("://")
        info["ip"] = rest.rsplit(":", 1)[0].strip("[]") if scheme in ("tcp", "tls") else "127.0.0.1"
    return info


def on_scheduler_kernel(
    info: dict[str, Any], magic_name: Any, qtconsole: bool, qtconsole_args: list[str] | None
) -> dict[str, Any]:
    """``Client.start_ipython_scheduler``'s user side: the magic, the qtconsole."""
    if magic_name == "scheduler_if_ipython":  # dask's default: %scheduler only in IPython
        magic_name = "scheduler" if user_shell() is not None else None
    if magic_name:
        register_kernel_magic(info, str(magic_name))
    if qtconsole:
        connect_qtconsole(info, "trioscheduler-scheduler", qtconsole_args)
    return info


def on_worker_kernels(
    infos: dict[str, dict[str, Any]],
    magic_names: Any,
    qtconsole: bool,
    qtconsole_args: list[str] | None,
) -> dict[str, dict[str, Any]]:
    """``Client.start_ipython_workers``'s user side: ``%remote``, per-worker magics."""
    names = expand_magic_names(magic_names, len(infos))
    register_remote_magic()
    for name, addr in zip(names, infos, strict=bool(names)):
        register_kernel_magic(infos[addr], name)
    if qtconsole:
        for addr, info in infos.items():
            label = "trioscheduler-" + addr.replace("://", "-").replace(":", "-").replace("/", "-")
            connect_qtconsole(info, label, qtconsole_args)
    return infos

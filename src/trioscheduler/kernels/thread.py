"""One ipykernel in a daemon thread of a process whose main thread runs ``trio.run``.

Stock ipykernel assumes it owns its process. Each setting below undoes one way it
would harm a server (the research's pitfalls A2-A15, named where they are handled):
an interrupt or shutdown request would signal the whole process or kill its children,
fd-level capture would ship everything the process writes, the process's stdout,
excepthook and ``__main__`` would be replaced, profiles and connection files would land
in HOME (running the user's startup scripts in a worker), and debugpy would be able to
freeze the server. Only one kernel can exist in a process (traitlets singletons).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import trio

from trioscheduler.kernels.routing import RoutedStream, in_kernel_cell

logger = logging.getLogger("trioscheduler.kernels")


class _Quiet(logging.Filter):
    """ipykernel's own log, minus its chatter and its advice to use a kernel manager."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "without encryption" in record.getMessage():
            return False  # said once by start_kernel, with what it means here
        return record.levelno >= logging.WARNING


_ipykernel_log = logging.getLogger("trioscheduler.kernels.ipykernel")
_ipykernel_log.addFilter(_Quiet())

_kernel_class: type | None = None
INTERRUPT_WAIT = 5.0  # seconds an interrupt waits for its cell to reach user code


def _set_async_exc(thread_id: int, exc: type[BaseException] | None) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id), ctypes.py_object(exc) if exc is not None else None
    )


def thread_kernel_class() -> type:
    """``IPythonKernel`` made safe for a thread of a server (built on first use:
    ipykernel is optional)."""
    global _kernel_class
    if _kernel_class is not None:
        return _kernel_class
    from ipykernel.ipkernel import IPythonKernel

    class ThreadKernel(IPythonKernel):
        kernel_thread_id: int | None = None
        cancel_trio_cell: Callable[[], None] | None = None  # set while an await cell runs
        # Interrupts are raised only inside user code (``guard_run_code``): raised in
        # ipykernel's own code, one would lose the cell's reply and hang the client.
        cell_lock = threading.Lock()
        in_user_code = 0  # run_code depth, changed under cell_lock
        _cell_requested = False  # an execute_request is being handled

        async def execute_request(self, *args: Any) -> None:
            self._cell_requested = True
            try:
                base: Any = super()
                await base.execute_request(*args)
            finally:
                self._cell_requested = False

        async def interrupt_request(self, *args: Any) -> None:
            # An interrupt that arrives while the cell is still on its way to user code
            # (publishing its input, compiling, entering the trio task) would be lost:
            # wait until it gets there, or ends.
            deadline = time.monotonic() + INTERRUPT_WAIT
            while (  # noqa: ASYNC110 - the flags change in other threads
                self._cell_requested
                and not (self.in_user_code or self.cancel_trio_cell is not None)
                and time.monotonic() < deadline
            ):
                await asyncio.sleep(0.005)
            base: Any = super()
            await base.interrupt_request(*args)

        def _send_interrupt_children(self) -> None:
            # A2: the stock kernel SIGINTs its process (or group): the server would die.
            cancel = self.cancel_trio_cell
            if cancel is not None:
                cancel()
                return
            with self.cell_lock:
                if self.in_user_code and self.kernel_thread_id is not None:
                    _set_async_exc(self.kernel_thread_id, KeyboardInterrupt)

        def _process_children(self) -> list[Any]:
            # A3: a shutdown request SIGTERMs/SIGKILLs the process group's children:
            # a nanny's workers, a task's subprocesses. None of them is the kernel's.
            return []

        async def poll_stopped_queue(self) -> None:
            # A7: no debugpy in a server (a breakpoint would freeze every task).
            return

        @property
        def kernel_info(self) -> dict[str, Any]:
            info: dict[str, Any] = super().kernel_info
            features = info.get("supported_features", [])
            info["supported_features"] = [f for f in features if f != "debugger"]
            return info

    _kernel_class = ThreadKernel
    return ThreadKernel


def trio_cell_runner(token: trio.lowlevel.TrioToken, kernel: Any) -> Callable[[Any], Any]:
    """IPython ``loop_runner``: a cell with top-level ``await`` runs as a task on the
    server's trio loop (atomic between checkpoints, so it may call the server's async
    methods); the kernel thread waits; an interrupt cancels it."""

    def run(coro: Coroutine[Any, Any, Any]) -> Any:
        async def cell() -> Any:
            in_kernel_cell.set(True)  # this task's output goes to the cell
            with trio.CancelScope() as scope:
                kernel.cancel_trio_cell = lambda: token.run_sync_soon(scope.cancel)
                try:
                    return await coro
                finally:
                    kernel.cancel_trio_cell = None
            raise KeyboardInterrupt("the cell was interrupted (its trio task was cancelled)")

        return trio.from_thread.run(cell, trio_token=token)

    return run


class KernelHandle:
    """A running kernel; ``stop`` is thread-safe and idempotent."""

    def __init__(self, app: Any, thread: threading.Thread, directory: str) -> None:
        self.app = app
        self.thread = thread
        self.directory = directory
        self.stopped = threading.Event()  # the kernel thread tore everything down
        self.loop: Any = None  # the kernel thread's tornado IOLoop
        self.closing = False  # stop() was called

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and not (self.closing or self.stopped.is_set())

    @property
    def user_ns(self) -> dict[str, Any]:
        ns: dict[str, Any] = self.app.kernel.shell.user_ns
        return ns

    def connection_info(self) -> dict[str, Any]:
        """JSON-safe (``key`` as text), as a connection file holds it."""
        info = dict(self.app.get_connection_info())
        if isinstance(info.get("key"), bytes):
            info["key"] = info["key"].decode()
        return info

    def stop(self, timeout: float = 2.0) -> bool:  # noqa: ASYNC109 - runs in a thread
        """Stop the kernel's loop (A9: interrupting a running cell first). False if the
        thread is stuck in C code: it is abandoned (a daemon) and no new kernel can start
        in this process until it returns."""
        self.closing = True
        if not self.thread.is_alive():
            return True
        loop = self.loop
        loop.add_callback(loop.stop)
        self.thread.join(0.2)
        if self.thread.is_alive():
            with contextlib.suppress(Exception):
                self.app.kernel._send_interrupt_children()
            self.thread.join(timeout)
        return not self.thread.is_alive()


def _isolate_app(app: Any, host: str, directory: str) -> None:
    app.config.HistoryManager.hist_file = ":memory:"
    app.ip = host
    app.kernel_class = thread_kernel_class()
    app.capture_fd_output = False  # A4: no dup2() of fds 1 and 2
    app.quiet = True
    # A8: profile (and startup scripts) and the connection file (it holds the HMAC key)
    # live in the server's own directory, not in HOME.
    profile = os.path.join(directory, "ipython")
    os.makedirs(profile, mode=0o700, exist_ok=True)
    app.ipython_dir = profile
    app.connection_file = os.path.join(directory, f"kernel-{os.getpid()}.json")
    app.init_signal = lambda: None  # A14: signal handlers are the main thread's (trio's)
    app.log_connection_info = lambda: None  # no banner on the server's stdout
    app.log = _ipykernel_log


def _cancel_leftovers(app: Any) -> None:
    """A7: cancel what ipykernel leaves pending, so exit prints no 'Task was destroyed'."""
    iopub = getattr(app, "iopub_thread", None)
    task = getattr(iopub, "_event_pipe_gc_task", None)  # private to ipykernel
    if iopub is not None and task is not None and not task.done():
        other = iopub.io_loop.asyncio_loop
        if other.is_running():

            async def cancel() -> None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

            future = asyncio.run_coroutine_threadsafe(cancel(), other)
            try:
                future.result(0.5)
            except Exception:  # that loop was stopping anyway
                future.cancel()
    loop = asyncio.get_event_loop()
    pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for t in pending:
        t.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))


def _teardown(app: Any, saved: tuple[Any, Any], directory: str) -> None:
    with contextlib.suppress(Exception):
        app.kernel.shell.history_manager.end_session()
    try:
        app.close()  # closes sockets and ipykernel's threads; resets sys.stdout/err
    finally:
        sys.stdout, sys.stderr = saved  # reset_io() set them to sys.__stdout__
        with contextlib.suppress(Exception):
            app.cleanup_connection_file()
        _forget_singletons()
        shutil.rmtree(directory, ignore_errors=True)


def _forget_singletons() -> None:
    """A1: a later kernel in this process needs fresh singletons; ``clear_instance`` only
    walks the MRO of the class it is called on, so call it on the most derived ones."""
    from ipykernel.kernelapp import IPKernelApp
    from ipykernel.zmqshell import ZMQInteractiveShell

    classes: tuple[Any, ...] = (thread_kernel_class(), IPKernelApp, ZMQInteractiveShell)
    for cls in classes:
        cls.clear_instance()


def start_kernel(
    namespace: dict[str, Any],
    *,
    host: str,
    directory: str,
    token: trio.lowlevel.TrioToken,
    timeout: float = 30.0,  # noqa: ASYNC109 - a blocking call, run in a thread
) -> KernelHandle:
    """Start the kernel thread and wait until it serves (blocking: call it in a thread).

    The thread tears the kernel down itself when its loop stops, whether ``stop`` or a
    client's ``shutdown_request`` stopped it.
    """
    from IPython import get_ipython

    if get_ipython() is not None:  # A1
        raise RuntimeError(
            "this process already runs IPython, which allows only one shell per process: "
            "the scheduler and workers are ordinary objects here (e.g. "
            "client.cluster.scheduler and client.cluster.workers)"
        )
    ready = threading.Event()
    box: dict[str, Any] = {}

    def body() -> None:
        asyncio.set_event_loop(asyncio.new_event_loop())  # tornado's loop for this thread
        saved = sys.stdout, sys.stderr
        main_module = sys.modules.get("__main__")
        hook = sys.excepthook
        try:
            from ipykernel.kernelapp import IPKernelApp

            app: Any = IPKernelApp.instance()
            _isolate_app(app, host, directory)
            app.initialize([])
            # A5: only a cell's output goes to the client
            sys.stdout = RoutedStream(sys.stdout, saved[0])
            sys.stderr = RoutedStream(sys.stderr, saved[1])
            # A6: the process's hook stays, also while a cell runs (run_code swaps in
            # shell.excepthook for the duration of every cell)
            sys.excepthook = hook
            shell = app.kernel.shell
            shell.excepthook = hook
            if main_module is not None:  # A15: cloudpickle needs the real __main__
                sys.modules["__main__"] = main_module
            app.kernel.kernel_thread_id = threading.get_ident()
            shell.user_ns.update(namespace)
            shell.loop_runner = trio_cell_runner(token, app.kernel)
            shell.autoawait = True
            guard_run_code(shell, app.kernel)
            _pin_autoawait(shell)
            in_kernel_cell.set(True)  # this thread (and its asyncio tasks) run cells
            from tornado.ioloop import IOLoop

            handle.loop = IOLoop.current()
            box["app"] = app
        except BaseException as exc:  # leave the process as it was
            sys.stdout, sys.stderr = saved
            sys.excepthook = hook
            if main_module is not None:
                sys.modules["__main__"] = main_module
            with contextlib.suppress(Exception):
                _forget_singletons()
            shutil.rmtree(directory, ignore_errors=True)
            box["error"] = exc
            ready.set()
            return
        ready.set()
        try:
            app.start()  # until the loop stops
        except BaseException as exc:  # an interrupt that arrived between cells
            logger.debug("kernel loop ended with %r", exc)
        finally:
            try:
                _cancel_leftovers(app)
                _teardown(app, saved, directory)
            finally:
                handle.stopped.set()

    thread = threading.Thread(target=body, daemon=True, name="trioscheduler-ipykernel")
    handle = KernelHandle(None, thread, directory)
    thread.start()
    if not ready.wait(timeout):
        raise TimeoutError(f"the IPython kernel did not start within {timeout} s")
    if "error" in box:
        raise box["error"]
    handle.app = box["app"]
    return handle


def guard_run_code(shell: Any, kernel: Any) -> None:
    """Mark where user code runs, so an interrupt lands there and nowhere else (A2).

    An interrupt raised just outside IPython's own handler (entering or leaving
    ``run_code``) is reported like one inside it; a pending one is dropped once the code
    is left.
    """
    original = shell.run_code

    async def run_code(code_obj: Any, result: Any = None, *, async_: bool = False) -> Any:
        with kernel.cell_lock:
            kernel.in_user_code += 1
        try:
            return await original(code_obj, result, async_=async_)
        except KeyboardInterrupt as exc:
            if result is not None:
                result.error_in_exec = exc
            shell.showtraceback()
            return True
        finally:
            with kernel.cell_lock:
                kernel.in_user_code -= 1
                if threading.get_ident() == kernel.kernel_thread_id:
                    _set_async_exc(threading.get_ident(), None)

    shell.run_code = run_code


def _pin_autoawait(shell: Any) -> None:
    """A10: ``%autoawait asyncio`` would run cells on a loop that is not the server's."""

    def autoawait(line: str = "") -> None:
        """Cells with ``await`` run on the server's trio loop; that cannot be changed."""
        print("autoawait: cells with `await` run as tasks on this server's trio loop")

    shell.register_magic_function(autoawait, magic_kind="line", magic_name="autoawait")

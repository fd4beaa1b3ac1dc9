"""Starting a worker process by ``fork()`` of the nanny: fast (the child has every
module imported already), and safe only while the parent is in a state a child can
inherit.

``_fork_worker`` forks from a fresh thread (never trio's own), refusing with
``_ForkUnsafe`` when another thread is importing or a fork-hostile library is loaded;
the child (``_forked_worker``) closes the parent's fds, resets signals, stdio, logging
and random state, sets the worker environment, then runs ``worker_process.main`` and
never returns. The parent waits for and signals the child by pidfd
(``_ForkedProcess``), as trio does for its own processes.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any, NoReturn

import psutil
import trio

logger = logging.getLogger("trioscheduler.nanny")

# Set for every worker unless the environment already says otherwise (as dask's
# ``distributed.nanny.pre-spawn-environ``). A fixed trim threshold turns off glibc's
# dynamic mmap threshold, under which a freed 8 MiB array makes later arrays of a few MiB
# come from the heap, where freeing them (after a spill, say) returns nothing to the OS:
# the worker's RSS stays high, it spills more and the nanny may kill it. One thread per
# BLAS/OpenMP pool, because the worker's own threads already fill the cores.
WORKER_ENVIRON = {
    "MALLOC_TRIM_THRESHOLD_": "65536",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
}
_M_TRIM_THRESHOLD = -1  # mallopt's parameter numbers in glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_DEFAULT_MMAP_THRESHOLD = 128 * 1024  # glibc's, before any dynamic raise


class _ForkUnsafe(Exception):
    """Forking is not safe at this moment; spawn instead."""


_fork_ok: bool | None = None


def fork_supported() -> bool:
    """Linux with ``pidfd_open``: a forked child is then waited for and signalled by pidfd,
    without reaping races or pid reuse, as trio does for its own processes."""
    global _fork_ok
    if _fork_ok is None:
        _fork_ok = False
        if sys.platform.startswith("linux") and hasattr(os, "pidfd_open"):
            try:
                os.close(os.pidfd_open(os.getpid()))
                _fork_ok = hasattr(signal, "pidfd_send_signal")
            except OSError:
                pass
    return _fork_ok


class _ForkedProcess:
    """The part of ``trio.Process`` the nanny uses, for a child made with ``os.fork``."""

    def __init__(self, pid: int, pidfd: int, stdin_fd: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._pidfd = pidfd
        self._lock = trio.Lock()
        self.stdin: trio.lowlevel.FdStream | None = trio.lowlevel.FdStream(stdin_fd)

    def __repr__(self) -> str:
        return f"<forked worker process {self.pid}: {self.returncode}>"

    def _reap(self) -> None:
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:  # someone else reaped it: the status is lost
            pid, status = self.pid, 255 << 8
        if pid:
            self.returncode = os.waitstatus_to_exitcode(status)
            os.close(self._pidfd)

    async def wait(self) -> int:
        async with self._lock:  # one waiter on the pidfd at a time, as trio.Process does
            while self.returncode is None:
                await trio.lowlevel.wait_readable(self._pidfd)
                self._reap()
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            signal.pidfd_send_signal(self._pidfd, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


async def _fork_worker(
    argv_for: Callable[[int], list[str]], ready_fd: int, pythonpath: str
) -> _ForkedProcess:
    """Fork from a new thread (not inside ``trio.run``); the child runs the worker."""
    stdin_r, stdin_w = os.pipe()  # the child's stdin: EOF when this process is gone
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()
    outcome: list[Any] = []

    def fork() -> None:
        try:
            outcome.append(_fork(argv_for, ready_fd, stdin_r, pythonpath))
        except BaseException as exc:
            outcome.append(exc)
        finally:
            token.run_sync_soon(done.set)

    try:
        threading.Thread(target=fork, name="trioscheduler-fork", daemon=True).start()
        with trio.CancelScope(shield=True):  # a forked child must not go unowned
            await done.wait()
    except BaseException:
        os.close(stdin_w)
        raise
    finally:
        os.close(stdin_r)
    result = outcome[0]
    if isinstance(result, BaseException):
        os.close(stdin_w)
        raise result
    pid, pidfd = result
    return _ForkedProcess(pid, pidfd, stdin_w)


def _fork(
    argv_for: Callable[[int], list[str]], ready_fd: int, stdin_fd: int, pythonpath: str
) -> tuple[int, int]:
    """``(pid, pidfd)`` in the parent; the child runs ``_forked_worker`` and never returns."""
    import _imp

    from trioscheduler.server.worker_process import parser

    parser()  # built once here, inherited ready by every child
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    collecting = gc.isenabled()
    _imp.acquire_lock()
    try:
        busy = _module_being_imported()
        if busy is not None:
            raise _ForkUnsafe(f"another thread is importing {busy!r}")
        gc.disable()  # no collection between the fork and the child's gc.freeze()
        pid = os.fork()
    except BaseException:
        if collecting:
            gc.enable()
        raise
    finally:
        _imp.release_lock()  # the child holds it once too (CPython re-takes it there)
    if pid == 0:
        _forked_worker(argv_for, ready_fd, stdin_fd, pythonpath, collecting)
    if collecting:
        gc.enable()
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    return pid, pidfd


def _fork_hostile_library() -> str | None:
    """A library loaded here whose state does not survive a fork, or None.

    CUDA contexts (torch, cupy) cannot be used in a forked child; jax and tensorflow run
    thread pools that fork leaves locked; GNU OpenMP (libgomp, loaded by torch and many
    compiled extensions) hangs in a forked child once the parent ran a parallel region.
    """
    for name in ("jax", "tensorflow", "cupy"):
        if name in sys.modules:
            return f"{name} is imported (its runtime does not survive a fork)"
    torch = sys.modules.get("torch")
    cuda = getattr(torch, "cuda", None)
    try:
        if cuda is not None and cuda.is_initialized():
            return "torch has initialized CUDA, which a forked child cannot use"
    except Exception:  # noqa: BLE001 - a half-imported torch: be careful
        return "torch is imported"
    try:
        with open("/proc/self/maps", "rb") as maps:
            if b"libgomp" in maps.read():
                return "GNU OpenMP (libgomp) is loaded, and hangs in a forked child"
    except OSError:
        pass
    return None


def _own_rss() -> int:
    """This process's RSS in bytes: /proc/self/statm (cheaper than a psutil.Process)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return int(psutil.Process().memory_info().rss)


def _module_being_imported() -> str | None:
    """The name of a module some thread is importing right now (its lock is held)."""
    import importlib._bootstrap as bootstrap

    locks = getattr(bootstrap, "_module_locks", {})
    for ref in list(locks.values()):
        lock = ref()
        if lock is not None and getattr(lock, "owner", None) is not None:
            return str(getattr(lock, "name", "?"))
    return None


_inherited: list[Any] = []  # the parent's objects the child replaced: never finalized


def _forked_worker(
    argv_for: Callable[[int], list[str]],
    ready_fd: int,
    stdin_fd: int,
    pythonpath: str,
    collecting: bool,
) -> NoReturn:
    """The forked child: make the process look freshly started, run the worker, exit."""
    code = 70  # EX_SOFTWARE, should anything below fail
    try:
        gc.freeze()  # the collector never finalizes what we inherited
        if collecting:
            gc.enable()
        os.setsid()  # as spawn's start_new_session: a terminal's Ctrl-C goes to the nanny
        if ready_fd < 3:  # this process had closed stdio: keep 0-2 what they were
            import fcntl

            ready_fd, low = fcntl.fcntl(ready_fd, fcntl.F_DUPFD, 3), ready_fd
            os.close(low)
        if stdin_fd != 0:
            os.dup2(stdin_fd, 0)
            if stdin_fd < 3:
                os.close(stdin_fd)
        _retire_fds(keep={0, 1, 2, ready_fd})
        _reset_signals()
        _reset_process_state()
        os.environ["PYTHONPATH"] = pythonpath
        _apply_worker_environ()
        try:
            with open("/proc/self/comm", "w") as comm:  # what ps and top show
                comm.write("trioscheduler")
        except OSError:
            pass
        from trioscheduler.server.worker_process import main

        code = main(argv_for(ready_fd))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        try:
            import traceback

            traceback.print_exc()
        except BaseException:
            pass
    finally:
        try:
            for handler in logging.getLogger().handlers:
                handler.flush()
            for stream in (sys.stdout, sys.stderr):
                if stream is not None:
                    stream.flush()
        finally:
            os._exit(code)


def _retire_fds(keep: set[int]) -> None:
    """Point every fd but ``keep`` at /dev/null (see the notes above ``_ForkUnsafe``)."""
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:  # no /proc: close them instead
        os.closerange(3, min(keep - {0, 1, 2}, default=3))
        os.closerange(max(keep) + 1, os.sysconf("SC_OPEN_MAX"))
        fds = []
    for fd in fds:
        if fd not in keep and fd != null:
            try:
                os.dup2(null, fd, inheritable=False)
            except OSError:
                pass
    os.close(null)


def _reset_signals() -> None:
    """Signal handling as in a fresh interpreter (this thread is the child's main one)."""
    signal.set_wakeup_fd(-1)
    for sig in signal.valid_signals():
        try:
            handler = signal.getsignal(sig)
            if sig == signal.SIGINT:
                signal.signal(sig, signal.default_int_handler)
            elif callable(handler):
                signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError):
            pass
    signal.pthread_sigmask(signal.SIG_SETMASK, ())


def _apply_worker_environ() -> None:
    """``WORKER_ENVIRON`` in a forked worker, as a spawned one gets it from its environment.

    glibc read its environment when the parent started, so the child sets the trim
    threshold with ``mallopt`` (unless the parent's environment chose one), and puts the
    mmap threshold back to glibc's default: the parent may have raised it dynamically
    already, and the child would inherit that. BLAS pools already loaded keep their size
    (the variables count for what the worker loads later).
    """
    chosen = "MALLOC_TRIM_THRESHOLD_" in os.environ
    for name, value in WORKER_ENVIRON.items():
        os.environ.setdefault(name, value)
    if chosen or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt(_M_TRIM_THRESHOLD, int(WORKER_ENVIRON["MALLOC_TRIM_THRESHOLD_"]))
        libc.mallopt(_M_MMAP_THRESHOLD, _DEFAULT_MMAP_THRESHOLD)
    except (OSError, AttributeError):  # not glibc (musl has no mallopt): nothing to do
        pass


def _reset_process_state() -> None:
    """Fresh stdio, logging without the parent's handlers, a new seed for numpy's global
    random state (``random`` reseeds itself at fork). (The client forgets the parent's default
    clients itself, with ``os.register_at_fork``.)"""
    import faulthandler

    _inherited.extend([sys.stdin, sys.stdout, sys.stderr])
    sys.stdin = _reopen(0, "r")
    sys.stdout = _reopen(1, "w")
    sys.stderr = _reopen(2, "w")
    if faulthandler.is_enabled():  # it wrote to a parent's fd; never cancel its watchdog
        faulthandler.disable()
        if sys.stderr is not None:
            faulthandler.enable(sys.stderr)
    loggers = [logging.getLogger()]
    loggers += [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    for lg in loggers:
        _inherited.append(lg.handlers)
        lg.handlers = []
        lg.setLevel(logging.WARNING if lg is loggers[0] else logging.NOTSET)
        lg.disabled = False
    logging.disable(logging.NOTSET)
    numpy_random = sys.modules.get("numpy.random")
    if numpy_random is not None:  # else every forked worker draws the parent's numbers
        state = getattr(getattr(numpy_random, "mtrand", None), "_rand", None)
        lock = getattr(getattr(state, "_bit_generator", None), "lock", None)
        if lock is None or lock.acquire(blocking=False):  # a thread we lost may hold it
            if lock is not None:
                lock.release()
            numpy_random.seed()


def _reopen(fd: int, mode: str) -> Any:
    try:
        os.fstat(fd)
    except OSError:
        return None
    line = fd == 2 or os.isatty(fd)
    return open(  # noqa: SIM115 - lives as long as the process
        fd,
        mode,
        buffering=1 if line and mode == "w" else -1,
        encoding=getattr(sys.__stderr__, "encoding", None) or "utf-8",
        errors="backslashreplace" if fd == 2 else "strict",
        closefd=False,
    )

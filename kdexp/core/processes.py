"""How kdexp forks, links and ends its processes.

Forking (:func:`can_fork`): on Linux a sweep forks its helpers (the grid's Hydra composition,
the pack workers) from its own process, which has already imported what they need.
``KDEXP_FORK=0``, and every other system, starts fresh interpreters or works in-process instead.

Ending (:func:`exit_now`): after torch, Lightning and W&B are imported, Python's own
shutdown (freeing every module and object one by one) takes 1.5–2.5 s on the 2-core machines
the README's figures come from, after every result is written and printed. A command-line
entry ends with :func:`exit_now` instead: it does what an exit does before that teardown
(joins threads, runs the ``atexit`` handlers: W&B's teardown, logging's final flush,
multiprocessing's joins), flushes the console, and ends the process at once.
Library calls (``kdexp.cli.main([...])`` in tests or notebooks) never exit.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import NoReturn

# KDEXP_FORK=0: no forked helpers (pack workers start as fresh interpreters, the grid composes in
# the sweep's own process), as on systems where fork is unsafe or absent.
FORK_ENV = "KDEXP_FORK"


def can_fork() -> bool:
    """Whether this process may fork its helpers: Linux, unless ``KDEXP_FORK=0``; elsewhere (macOS,
    Windows) fork is unsafe or absent."""
    import multiprocessing

    return (os.environ.get(FORK_ENV, "1") != "0" and sys.platform.startswith("linux")
            and "fork" in multiprocessing.get_all_start_methods())


def die_with_parent() -> None:
    """In a child: get SIGTERM if its parent dies, even by SIGKILL (Linux; elsewhere Ctrl-C and
    SIGTERM are still forwarded by the sweep)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def exit_code(code: object) -> int:
    """What ``sys.exit(code)`` would end with: None is 0, an int is itself, anything else is
    printed to stderr and ends with 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def exit_now(code: object) -> NoReturn:
    """End the process with ``code`` (as ``sys.exit`` reads it), skipping the interpreter's teardown."""
    status = exit_code(code)
    # What Python's own exit does first, in its order: wait for non-daemon threads and run
    # threading's exit callbacks (joblib's loky workers are told to stop there), then the atexit
    # handlers. Only the teardown of modules and objects after them is skipped.
    shutdown_threads = getattr(threading, "_shutdown", None)
    if shutdown_threads is not None:
        shutdown_threads()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BrokenPipeError:  # `kdexp ... | head`: what was still buffered never reached its reader
            status = status or broken_pipe_exit()
        except (OSError, ValueError):  # a closed stream
            pass
    os._exit(status)


def run_then_exit(main: Callable[[], object]) -> NoReturn:
    """A console entry: ``main()``, its return value (or ``SystemExit`` code) as the exit code, then
    :func:`exit_now`."""
    try:
        code = main()
    except SystemExit as stop:  # argparse's --help and usage errors, Hydra's exits
        code = stop.code
    except BrokenPipeError:  # `kdexp ... | head`: the reader has gone; end quietly, as a program that
        code = broken_pipe_exit()  # SIGPIPE ended would, instead of a traceback about it
    exit_now(code)


def broken_pipe_exit() -> int:
    """Point stdout at /dev/null (output still buffered for the closed pipe is dropped, not raised
    again at exit) and return the status of a process that SIGPIPE ended, 128 + 13."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no file descriptor behind stdout: exit_now's flush ignores the error
        pass
    return 128 + int(getattr(signal, "SIGPIPE", 13))

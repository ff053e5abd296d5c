"""Stepbox's Python runner: the guest side of the `python` runtime.

This module is imported once, at build time, by componentize-py, which then snapshots the
initialised interpreter into a WASI component. Every step run instantiates that snapshot afresh
and calls `WitWorld.run_step` once, so nothing a step does survives into another run.

Only modules imported while the snapshot is taken exist at run time (the component carries no
standard-library files), so the import sweep below pulls in every standard-library module that
imports on WASI, after every module of the bundled third-party packages (`stepbox_packages`).
`AVAILABLE_MODULES` records the result; `missing_stdlib_modules()` the rest. Last, everything alive
is moved to the garbage collector's permanent generation, so a step's full collections do not walk
the snapshot's objects.
"""

import builtins
import importlib
import linecache
import os
import pkgutil
import sys
import traceback

import wit_world
from wit_world.imports import environment

# Modules never worth carrying: test suites, GUI and REPL tooling, modules that act on import
# (`this` prints, `antigravity` opens a browser), and packaging tools that need a real platform.
_SKIP_TOP = {
    "__main__", "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test",
    "lib2to3", "ensurepip", "venv", "pydoc_data", "_pyrepl", "site", "sitecustomize",
    "usercustomize", "_tkinter", "pip",
}
# Sub-packages whose import only fails or drags in tests.
_SKIP_SUB = ("test", "tests", "idle_test", "__main__")


def _sweep_stdlib():
    imported = []
    for name in sorted(sys.stdlib_module_names):
        if name in _SKIP_TOP:
            continue
        try:
            module = importlib.import_module(name)
        except BaseException:  # noqa: BLE001 - anything that fails to import is simply absent
            continue
        imported.append(name)
        path = getattr(module, "__path__", None)
        if not path:
            continue
        for info in pkgutil.walk_packages(path, name + ".", onerror=lambda _name: None):
            if any(part in _SKIP_SUB for part in info.name.split(".")):
                continue
            try:
                importlib.import_module(info.name)
            except BaseException:  # noqa: BLE001
                continue
    return imported


# The bundled third-party packages first (stepbox_packages.py): their largest compile-time peaks
# then come while the heap is small, which keeps the snapshot's memory image small.
import stepbox_packages  # noqa: E402

stepbox_packages.load()
_sweep_stdlib()
# `_strptime` and the codecs are loaded lazily by datetime.strptime and str.encode: make sure.
for _name in ("_strptime", "encodings.idna", "encodings.latin_1", "encodings.utf_16",
              "encodings.cp1252", "encodings.ascii", "encodings.utf_8_sig"):
    try:
        importlib.import_module(_name)
    except BaseException:  # noqa: BLE001
        pass


def _asyncio_without_self_pipe():
    """Let asyncio's selector event loop run without its self-pipe on WASI.

    `BaseSelectorEventLoop.__init__` opens a socket pair (the "self-pipe") that only serves to wake
    the loop's `select()` from elsewhere: `call_soon_threadsafe` from another thread, and signal
    numbers written by the C signal handler for `add_signal_handler`. The sandbox refuses sockets
    (by design: no network at all), so creating any event loop failed. WASI has no threads (a
    thread cannot start) and delivers no signals, so nothing can ever need to wake the loop: with
    the one thread inside the loop, callbacks it schedules itself are seen on the next iteration,
    and timers bound the selector's timeout as usual. So on WASI the loop gets no self-pipe:
    `_ssock` and `_csock` stay None, `_read_from_self` is never registered, `_write_to_self`
    already returns when `_csock` is None, and closing skips the pipe. `add_signal_handler` (which
    hands `_csock` to `signal.set_wakeup_fd`) raises NotImplementedError, as on loops without
    signal support; asyncio.run's own SIGINT handling uses `signal.signal` and is unaffected.
    Sockets themselves stay refused.
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

AVAILABLE_MODULES = frozenset(sys.modules)


def missing_stdlib_modules():
    """Public standard-library modules that cannot be imported in this runtime."""
    return sorted(n for n in sys.stdlib_module_names
                  if not n.startswith("_") and n not in AVAILABLE_MODULES)


def _exit_code(exc):
    """The exit code CPython's own `sys.exit` handling would give."""
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, bool):
        return int(code)
    if isinstance(code, int):
        return max(-(2**31), min(code, 2**31 - 1))
    # CPython prints any other object to stderr and exits with 1.
    try:
        print(code, file=sys.stderr)
    except BaseException:  # noqa: BLE001
        pass
    return 1


def _print_uncaught(exc):
    """Print a traceback the way `python3 step.py` would: without the runner's own frame."""
    tb = exc.__traceback__
    if tb is not None and tb.tb_frame.f_code is WitWorld.run_step.__code__:
        tb = tb.tb_next
    try:
        traceback.print_exception(type(exc), exc, tb, file=sys.stderr)
    except BaseException:  # noqa: BLE001
        pass


def _reset_process_state(filename, cwd):
    """Replace build-time values baked into the snapshot with this run's."""
    args = list(environment.get_arguments())
    sys.argv = args if args else [filename]
    sys.argv[0] = filename
    os.environ.clear()
    for key, value in environment.get_environment():
        os.environ[key] = value
    os.chdir(cwd)
    # The snapshot froze the PRNG state seeded at build time: reseed from the host's random source
    # (which a deterministic policy makes deterministic).
    import random
    random.seed()
    import tempfile
    tempfile.tempdir = None


class WitWorld(wit_world.WitWorld):
    def run_step(self, source: str, filename: str, cwd: str) -> int:
        code = 0
        try:
            _reset_process_state(filename, cwd)
            main = type(sys)("__main__")
            main.__dict__.update({"__file__": filename, "__builtins__": builtins,
                                  "__cached__": None})
            sys.modules["__main__"] = main
            linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
            compiled = compile(source, filename, "exec", dont_inherit=True)
            exec(compiled, main.__dict__)
        except SystemExit as exc:
            code = _exit_code(exc)
        except BaseException as exc:  # noqa: BLE001 - an escaping exception would trap the component
            _print_uncaught(exc)
            code = 1
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:  # noqa: BLE001 - a full or closed pipe must not turn into a trap
                if code == 0:
                    code = 120  # what CPython exits with when flushing stdout fails at shutdown
        return code


# Last thing before the snapshot: collect what the sweeps left, then freeze every survivor (module
# objects, functions, caches) into the permanent generation. A step's `gc.collect()` then walks only
# the step's own objects instead of the whole snapshot.
import gc  # noqa: E402

gc.collect()
gc.freeze()

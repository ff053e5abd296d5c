"""A minimal stand-in for `pyperf`, enough for pyperformance's stdlib-only benchmarks.

benches/pyperformance.py embeds this source in every generated step and registers it as the module
`pyperf` before the benchmark's own `run_benchmark.py` runs, so the same file runs under native
python3 and inside the sandbox (no subprocesses, no worker processes, no pyperf dependency).

Unlike pyperf it runs each benchmark once, in this process: one warmup call with loops=1, then one
timed call with a fixed loop count taken from `LOOPS` (the same table natively and in the sandbox).
When a single loop already takes the calibration target (loops == 1) the warmup is left out: it
would double the step's time (the sandbox's default policy allows 30 s) for no steadier result.
When `CALIBRATE` is set (seconds), it instead picks the loop count itself: it doubles loops until
the timed region takes a quarter of that, then scales to the target. Either way it prints, per
bench_* call, one line on stdout:

    PYPERF_RESULT name=<name> seconds=<timed seconds> loops=<loops> inner_loops=<n>
"""
import argparse
import functools
import sys
import time

perf_counter = time.perf_counter

# Set by the generated step before the benchmark runs.
LOOPS = {}  # bench name -> loops
DEFAULT_LOOPS = 1
CALIBRATE = None  # target seconds per bench name, or None to use LOOPS


def python_implementation():
    return sys.implementation.name.lower()


def python_has_jit():
    return False


class Runner:
    def __init__(self, values=None, processes=None, loops=0, min_time=None, metadata=None,
                 show_name=True, program_args=None, add_cmdline_args=None, _argparser=None,
                 warmups=None, **_kwargs):
        self.metadata = dict(metadata or {})
        self.argparser = _argparser or argparse.ArgumentParser(description="pyperf stand-in")
        self.args = None
        self.results = []

    def parse_args(self, args=None):
        if self.args is None:
            self.args = self.argparser.parse_args(args)
        return self.args

    # Each bench_* method reduces to `time_func(loops) -> seconds` and hands it to _run.

    def bench_time_func(self, name, time_func, *args, inner_loops=None, metadata=None):
        return self._run(name, lambda loops: time_func(loops, *args), inner_loops)

    def bench_func(self, name, func, *args, inner_loops=None, metadata=None):
        if args:
            func = functools.partial(func, *args)

        def time_func(loops):
            range_it = range(loops)
            t0 = perf_counter()
            for _ in range_it:
                func()
            return perf_counter() - t0

        return self._run(name, time_func, inner_loops)

    def bench_async_func(self, name, func, *args, inner_loops=None, metadata=None,
                         loop_factory=None):
        import asyncio

        if args:
            func = functools.partial(func, *args)

        def time_func(loops):
            async def main():
                range_it = range(loops)
                t0 = perf_counter()
                for _ in range_it:
                    await func()
                return perf_counter() - t0

            loop = loop_factory() if loop_factory is not None else asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                return loop.run_until_complete(main())
            finally:
                asyncio.set_event_loop(None)
                loop.close()

        return self._run(name, time_func, inner_loops)

    def bench_command(self, name, command):
        raise NotImplementedError(f"{name}: bench_command runs a subprocess, which the stand-in does not do")

    def _run(self, name, time_func, inner_loops):
        self.parse_args()
        if CALIBRATE is not None:
            time_func(1)  # warmup
            loops = 1
            while True:
                dt = time_func(loops)
                if dt >= CALIBRATE / 4 or loops >= 1 << 40:
                    break
                loops *= 2
            loops = max(1, round(loops * CALIBRATE / dt)) if dt > 0 else loops
        else:
            loops = LOOPS.get(name, DEFAULT_LOOPS)
            if loops > 1:
                time_func(1)  # warmup
            dt = time_func(loops)
        self.results.append((name, dt, loops))
        print(f"PYPERF_RESULT name={name} seconds={dt!r} loops={loops} inner_loops={inner_loops or 1}", flush=True)
        return dt

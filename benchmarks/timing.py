"""Interleaved timing: every variant runs once per round, in a rotating order.

Other processes on a shared machine slow down whole stretches of time; running
the variants in turn, round after round, spreads that noise over all of them,
and the median of each variant's rounds drops most of what is left. Every
figure the harness reports is a ratio of two such medians from the same run.
"""

import statistics
import time


def interleaved(functions, rounds, steps=1):
    """Times each function `steps` times per round, for `rounds` rounds.

    Args:
        functions: dict name -> callable with no argument that runs one step
            and returns only when the step is finished (e.g. it converts a
            result to NumPy).
        rounds: number of rounds.
        steps: calls per function per round; a round records their mean.

    Returns:
        (wall, cpu): two dicts name -> list of seconds per call, one entry per
        round: wall-clock time, and CPU time of this process (all its threads;
        time spent waiting for a core that another process holds does not
        count, so it is less sensitive to a busy machine).
    """
    names = list(functions)
    wall = {name: [] for name in names}
    cpu = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(steps):
                functions[name]()
            wall[name].append((time.perf_counter() - start) / steps)
            cpu[name].append((time.process_time() - start_cpu) / steps)
    return wall, cpu


def median(values):
    return statistics.median(values)


def timed(function):
    """Runs `function` once; returns (its result, seconds)."""
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start

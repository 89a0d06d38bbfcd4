"""The heap trimmer: glibc's malloc_trim once a burst of call set-ups is over, at most once per interval."""
import platform

import pytest

from callweaver.heap import HeapTrimmer, glibc_malloc_trim


class Spawned:
    """A spawn stand-in that keeps the tasks, to run them when the test says."""

    def __init__(self):
        self.tasks = []

    def __call__(self, fn):
        self.tasks.append(fn)

    def run_all(self):
        tasks, self.tasks = self.tasks, []
        for fn in tasks:
            fn()


def test_one_trim_after_a_burst_of_set_ups():
    trims, spawned = [], Spawned()
    trimmer = HeapTrimmer(spawned, trims.append, quiet_s=0, min_interval_s=0)
    for _ in range(25):
        trimmer.call_set_up()
    assert len(spawned.tasks) == 1  # one waiting task for the whole burst
    spawned.run_all()
    assert trims == [0] and trimmer.trims == 1 and not trimmer.pending
    trimmer.call_set_up()  # the next burst gets its own trim
    spawned.run_all()
    assert trims == [0, 0]


def test_no_trim_function_means_nothing_runs():
    spawned = Spawned()
    trimmer = HeapTrimmer(spawned, None)
    trimmer.call_set_up()
    assert spawned.tasks == [] and trimmer.trims == 0


def test_a_failing_trim_is_logged_and_the_next_burst_tries_again():
    def broken(_pad):
        raise OSError("no")

    spawned = Spawned()
    trimmer = HeapTrimmer(spawned, broken, quiet_s=0, min_interval_s=0)
    trimmer.call_set_up()
    spawned.run_all()
    assert not trimmer.pending and trimmer.trims == 0
    trimmer.call_set_up()
    assert len(spawned.tasks) == 1


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_glibc_malloc_trim_is_found_and_callable_on_glibc():
    trim = glibc_malloc_trim()
    assert trim is not None
    assert trim(0) in (0, 1)


def test_a_trim_that_cannot_be_scheduled_neither_fails_the_call_nor_disables_the_trimmer():
    """A spawn that raised (no thread to start) left the trimmer waiting for a task that never ran (review)."""
    attempts = []

    def spawn(work):
        attempts.append(work)
        if len(attempts) == 1:
            raise RuntimeError("can't start new thread")

    trimmer = HeapTrimmer(spawn, trim=lambda pad: 1)
    trimmer.call_set_up()
    trimmer.call_set_up()
    assert len(attempts) == 2

"""ThreadTuner: keeps n - 1 torch threads only where the loop's steps are measurably faster with them,
probes again when the step time drifts, and always gives the loop's own count back; a Prefetcher tunes
only when asked to."""

from __future__ import annotations

import time

import pytest
import torch

from mlkv.torch import Prefetcher
from mlkv.torch import thread_tuner as tt


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def run_loop(tuner: tt.ThreadTuner, steps: int, seconds_at) -> list[int]:
    """Steps whose length is seconds_at(step, torch threads now); returns the thread count of each."""
    used = []
    for i in range(steps):
        tuner.step()
        n = torch.get_num_threads()
        used.append(n)
        time.sleep(seconds_at(i, n))
    return used


def test_keeps_one_thread_less_when_steps_are_faster_with_it_and_restores(two_threads):
    tuner = tt.ThreadTuner()
    used = run_loop(tuner, tt.PROBE_STEPS + 5, lambda i, n: 0.006 if n == 2 else 0.001)
    assert tuner.choices == [1]
    assert used[-5:] == [1] * 5
    assert 1 in used[: tt.PROBE_STEPS] and used[0] == 2  # both counts were timed
    tuner.restore()
    assert torch.get_num_threads() == 2


def test_keeps_the_loops_count_when_one_less_is_not_faster(two_threads):
    tuner = tt.ThreadTuner()
    used = run_loop(tuner, tt.PROBE_STEPS + 5, lambda i, n: 0.001 if n == 2 else 0.006)
    assert tuner.choices == [2]
    assert used[-5:] == [2] * 5


def test_a_drifting_step_time_calls_a_new_probe_that_can_change_the_choice(two_threads):
    """While the tier fills both counts step alike (the loop's count is kept); once the steps slow down
    the drift calls a probe, which finds one thread less faster."""
    first_probe_end = tt.PROBE_STEPS
    switch = first_probe_end + tt.WINDOW

    def seconds(i, n):
        if i < switch:
            return 0.002
        return 0.008 if n == 2 else 0.003

    tuner = tt.ThreadTuner()
    # the drift shows in the window after `switch`; then a whole probe
    used = run_loop(tuner, switch + 2 * tt.WINDOW + tt.PROBE_STEPS - tt.WARMUP + 3, seconds)
    assert tuner.choices == [2, 1]
    assert used[-3:] == [1] * 3


def test_a_run_speeding_up_during_the_probe_does_not_favour_either_count(two_threads):
    """Steps that shorten steadily (a warming cache) at both counts alike: the interleaved probe sees no
    difference and keeps the loop's count. Timed one after the other, n - 1 would have looked faster."""
    tuner = tt.ThreadTuner()
    run_loop(tuner, tt.PROBE_STEPS + 1, lambda i, n: max(0.0005, 0.008 - 0.00018 * i))
    assert tuner.choices == [2]


def test_a_single_threaded_loop_is_left_alone():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tuner = tt.ThreadTuner()
        used = run_loop(tuner, tt.PROBE_STEPS + 2, lambda i, n: 0.0)
        assert set(used) == {1} and tuner.choices == []
    finally:
        torch.set_num_threads(before)


class _Tables:
    def table(self, name):
        return self

    def lookahead(self, keys):
        pass


def test_a_prefetcher_tunes_only_when_asked_and_gives_the_count_back_when_the_pass_ends(two_threads):
    steps = tt.PROBE_STEPS + 4
    plain = Prefetcher(range(steps), lambda b: {"t": torch.tensor([b])}, _Tables(), depth=2)
    seen = []
    for _ in plain:
        seen.append(torch.get_num_threads())
        time.sleep(0.004 if torch.get_num_threads() == 2 else 0.001)
    assert set(seen) == {2} and plain.tuner is None

    tuned = Prefetcher(
        range(steps), lambda b: {"t": torch.tensor([b])}, _Tables(), depth=2, tune_threads=True
    )
    for i, _ in enumerate(tuned):
        time.sleep(0.006 if torch.get_num_threads() == 2 else 0.001)
        if i == steps - 2:
            assert torch.get_num_threads() == 1
            break  # leaving the loop early ends the pass too
    tuned.close()
    assert tuned.tuner.choices == [1]
    assert torch.get_num_threads() == 2


def test_freeze_ends_a_probe_at_the_kept_count_and_probes_no_more(two_threads):
    tuner = tt.ThreadTuner()
    run_loop(tuner, tt.PROBE_STEPS + 1, lambda i, n: 0.006 if n == 2 else 0.001)
    assert tuner.choices == [1]
    tuner._next_probe = tuner._steps  # a probe is due now ...
    tuner.step()
    assert tuner._plan  # ... and running
    tuner.freeze()
    used = run_loop(tuner, 3 * tt.RECHECK // 2, lambda i, n: 0.0)
    assert set(used) == {1} and tuner.choices == [1]


def test_restore_from_another_thread_leaves_the_tuned_threads_count_alone(two_threads):
    import threading

    tuner = tt.ThreadTuner()
    run_loop(tuner, tt.PROBE_STEPS + 1, lambda i, n: 0.006 if n == 2 else 0.001)
    assert torch.get_num_threads() == 1
    t = threading.Thread(target=tuner.restore)
    t.start()
    t.join()
    assert torch.get_num_threads() == 1 and tuner.threads == 1
    tuner.restore()
    assert torch.get_num_threads() == 2


def test_freeze_in_the_middle_of_a_probe_decides_on_the_steps_timed_so_far(two_threads):
    tuner = tt.ThreadTuner()
    run_loop(tuner, tt.WARMUP + 3 * (tt.BLOCK + 1) + 1, lambda i, n: 0.006 if n == 2 else 0.001)
    assert tuner._plan and tuner.choices == []  # both counts timed, the probe not finished
    tuner.freeze()
    assert tuner.choices == [1] and torch.get_num_threads() == 1


def test_a_prefetcher_refuses_a_tune_threads_that_is_not_a_bool():
    from mlkv.errors import InvalidTypeError

    with pytest.raises(InvalidTypeError, match="tune_threads must be a bool, got str"):
        Prefetcher(range(3), lambda b: {"t": torch.tensor([b])}, _Tables(), tune_threads="yes")

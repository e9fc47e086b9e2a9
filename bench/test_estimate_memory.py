"""bench/estimate_memory.py: the fake-tensor peak-memory estimate runs on the CPU and ranks the
formulations as the GPU does (the authors' loop holds the Nq x Nkv attention matrices)."""
from estimate_memory import estimate


def test_refine_estimate_ranks_the_reference_loop_above_the_engine():
    ours = estimate("refine", "auto", size=(64, 64), preset="tiny")
    theirs = estimate("refine", "reference", size=(64, 64), preset="tiny")
    assert 0 < ours.peak < theirs.peak
    assert ours.at_peak and all(m[0] > 0 for m in ours.at_peak)


def test_training_estimate_under_autocast_holds_less_than_the_reference():
    ours = estimate("train", "auto", batch=2, patch=32, amp=True, preset="tiny")
    theirs = estimate("train", "reference", batch=2, patch=32, amp=True, preset="tiny")
    assert 0 < ours.peak < theirs.peak

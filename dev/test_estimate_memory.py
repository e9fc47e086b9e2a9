"""dev/estimate_memory.py: the fake-tensor peak-memory estimate runs on the CPU and ranks the
formulations as the GPU does (the authors' loop holds the Nq x Nkv attention matrices)."""
from estimate_memory import estimate


def test_refine_estimate_ranks_the_reference_loop_above_the_engine():
    ours = estimate("refine", "auto", size=(64, 64), preset="tiny")
    theirs = estimate("refine", "reference", size=(64, 64), preset="tiny")
    assert 0 < ours.peak < theirs.peak
    assert ours.at_peak and all(m[0] > 0 for m in ours.at_peak)
    # the shared encoder and the cached dictionary work move fewer bytes in fewer kernels
    assert 0 < sum(ours.traffic.values()) < sum(theirs.traffic.values())
    assert 0 < ours.kernels < theirs.kernels


def test_training_estimate_under_autocast_holds_less_than_the_reference():
    ours = estimate("train", "auto", batch=2, patch=32, amp=True, preset="tiny")
    theirs = estimate("train", "reference", batch=2, patch=32, amp=True, preset="tiny")
    assert 0 < ours.peak < theirs.peak


def test_traffic_counts_kernels_not_views():
    import torch
    from estimate_memory import LiveBytes
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    image, weight = torch.randn(1, 3, 5, 5), torch.randn(3, 1, 3, 3)
    with LiveBytes() as tracker:
        x.view(8, 4).t()            # views: no kernel
        x.contiguous(), x.float()   # returned their input: no kernel
        x.add_(y)                   # in place: reads x and y, writes x
        torch.nn.functional.conv2d(image, weight, groups=3)
    assert tracker.kernels == 2
    assert tracker.traffic["add_"] == 3 * x.numel() * 4
    (conv_kind,) = [kind for kind in tracker.traffic if kind != "add_"]
    assert conv_kind.endswith("depthwise 3x3")
    assert tracker.traffic[conv_kind] == (image.numel() + weight.numel() + 3 * 3 * 3) * 4

"""Restoring collections: inputs from files, folders and patterns, output names, formats, steps."""
from __future__ import annotations

import pytest
import torch

from sipl_fast.images import read_image, write_image
from sipl_fast.model import SIPLPromptIR
from sipl_fast.refine import Refiner
from sipl_fast.restore import RestoreError, check_targets, collect_inputs, plan, step_images


def _image(path, bits=8, size=(12, 10), seed=0):
    generator = torch.Generator().manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".tif": "tiff", ".tiff": "tiff", ".jpg": "jpeg"}.get(path.suffix, "png")
    write_image(path, torch.rand(3, *size, generator=generator), bit_depth=bits, format=fmt)
    return path


def test_inputs_from_files_folders_and_patterns(tmp_path):
    a = _image(tmp_path / "a" / "x.png")
    b = _image(tmp_path / "b" / "x.png")
    deep = _image(tmp_path / "a" / "sub" / "y.tif", bits=16)
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    assert collect_inputs([str(tmp_path / "a")]) == [a]
    assert collect_inputs([str(tmp_path / "a")], recursive=True) == [deep, a]
    assert collect_inputs([str(tmp_path / "*" / "x.png")]) == [a, b]
    assert collect_inputs([str(tmp_path / "**" / "*.tif")]) == [deep]
    # each file once, in the order given
    assert collect_inputs([str(b), str(tmp_path / "b"), str(a)]) == [b, a]
    with pytest.raises(RestoreError, match="missing.png: no such file or folder"):
        collect_inputs([str(tmp_path / "missing.png")])
    with pytest.raises(RestoreError, match="the pattern matches no image file"):
        collect_inputs([str(tmp_path / "*.jpeg")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(RestoreError, match="empty: no images in it \\(--recursive"):
        collect_inputs([str(tmp_path / "empty")])


def test_output_names_keep_relative_paths_and_never_collide(tmp_path):
    a, b = _image(tmp_path / "a" / "x.png"), _image(tmp_path / "b" / "x.png")
    jpg = _image(tmp_path / "a" / "x.jpg")
    out = tmp_path / "out"
    jobs = plan([a, b, jpg], out)
    assert [job.target for job in jobs] == [out / "a" / "x_png.png", out / "b" / "x.png", out / "a" / "x_jpg.png"]
    assert [job.format for job in jobs] == ["png"] * 3
    # one input: its name under out
    assert plan([a], out)[0].target == out / "x.png"
    same = plan([a, jpg, _image(tmp_path / "a" / "z.tiff", bits=16)], out, format="same")
    assert [(j.target.name, j.format) for j in same] == [("x_png.png", "png"), ("x_jpg.jpg", "jpeg"),
                                                         ("z.tiff", "tiff")]
    assert plan([a], out, format="tiff")[0].target == out / "x.tif"
    steps = plan([b], out, save_steps=2)[0]
    assert steps.step_targets == [out / f"x_step{t}.png" for t in range(3)]
    with pytest.raises(RestoreError, match="--format must be one of png, tiff, same"):
        plan([a], out, format="bmp")
    with pytest.raises(RestoreError, match="would overwrite an input"):
        plan([a], tmp_path / "a")


def test_existing_outputs_are_refused_skipped_or_replaced(tmp_path):
    a, b = _image(tmp_path / "in" / "a.png"), _image(tmp_path / "in" / "b.png")
    out = tmp_path / "out"
    jobs = plan([a, b], out)
    assert check_targets(jobs, overwrite=False, skip_existing=False) == jobs
    _image(out / "a.png")
    with pytest.raises(RestoreError, match="a.png exists; pass --overwrite to replace it or --skip-existing"):
        check_targets(jobs, overwrite=False, skip_existing=False)
    assert check_targets(jobs, overwrite=False, skip_existing=True) == jobs[1:]
    assert check_targets(jobs, overwrite=True, skip_existing=False) == jobs
    with pytest.raises(RestoreError, match="contradict"):
        check_targets(jobs, overwrite=True, skip_existing=True)
    (out / "b.png").mkdir()
    with pytest.raises(RestoreError, match="b.png: the output of .* would replace a folder"):
        check_targets(jobs, overwrite=True, skip_existing=False)


@pytest.mark.parametrize("fmt, suffix", [("png", ".png"), ("tiff", ".tif")])
def test_sixteen_bits_survive_png_and_tiff(tmp_path, fmt, suffix):
    rgb = torch.rand(3, 9, 13)
    path = tmp_path / f"x{suffix}"
    write_image(path, rgb, bit_depth=16, format=fmt)
    image = read_image(path)
    assert image.bit_depth == 16 and (image.rgb - rgb).abs().max() <= 1 / 65535


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = SIPLPromptIR.from_preset("tiny").eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.1)
    return model


def test_step_images_equal_refinements_of_each_length(tiny):
    """Step t of step_images is what a refinement with t steps returns: the steps chain on the
    image padded once (21x27 -> 24x32), exactly as one refinement iterates."""
    x = torch.rand(1, 3, 21, 27)

    def make(steps):
        return Refiner(tiny, steps=steps)

    images = step_images(make, x, 2, tiled=False)
    assert len(images) == 3
    for steps, image in enumerate(images):
        assert image.shape == x.shape
        torch.testing.assert_close(image, make(steps)(x), atol=2e-5, rtol=0)
    assert not torch.equal(images[1], images[2])

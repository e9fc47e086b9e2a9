"""Evaluation by the PromptIR and BasicSR protocols: scores against scikit-image and a
transcription of BasicSR, per-image CSV, saved images, refusals, precision, memory."""
import csv
import gc
import math
import weakref
from collections.abc import Sequence

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_metrics import basicsr_reference, promptir_reference

from sipl_fast.data.datasets import EvalSample
from sipl_fast.evaluation import (EvaluationError, OutputExistsError, csv_columns, evaluate, format_table,
                                  write_csv)
from sipl_fast.model import PromptIR, SIPLPromptIR

# Odd sizes, neither multiples of 16 nor of 8: PromptIR keeps the centre 32x48 and 32x32.
SIZES = {"a.png": (40, 52), "sub/b.png": (37, 45)}
TASKS = {"a.png": "noise25", "sub/b.png": "haze"}
CROPPED = {"a.png": (32, 48), "sub/b.png": (32, 32)}


def _make_samples(names=tuple(SIZES), seed=0) -> list[EvalSample]:
    g = torch.Generator().manual_seed(seed)
    samples = []
    for name in names:
        h, w = SIZES.get(name, (40, 52))
        gt = 0.1 + 0.8 * torch.rand(3, h, w, generator=g)
        lq = (gt + 0.08 * torch.randn(3, h, w, generator=g)).clamp(0, 1)
        samples.append(EvalSample(TASKS.get(name, "noise25"), name, lq, gt))
    return samples


def _crop_img(image: np.ndarray, base: int = 16) -> np.ndarray:
    """PromptIR's utils/image_utils.py crop_img, on an (H, W, C) array."""
    h, w = image.shape[0], image.shape[1]
    crop_h, crop_w = h % base, w % base
    return image[crop_h // 2:h - crop_h + crop_h // 2, crop_w // 2:w - crop_w + crop_w // 2, :]


def _hwc(image: torch.Tensor) -> np.ndarray:
    return image.permute(1, 2, 0).double().numpy()


def _read_png(path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.mode == "RGB"
        return np.asarray(image)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The passes here are small: one thread never waits on a second one that shares the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return SIPLPromptIR.from_preset("tiny").eval()


@pytest.fixture(scope="module")
def promptir_run(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("promptir") / "images"
    samples = _make_samples()
    return samples, evaluate(model, samples, steps=1, keep_outputs=True, save_images=folder), folder


def test_promptir_protocol_scores_the_centre_crop_with_skimage(model, promptir_run):
    samples, evaluation, _ = promptir_run
    assert evaluation.protocol == "promptir"
    for sample, record in zip(samples, evaluation.images):
        lq, gt = _crop_img(_hwc(sample.lq)), _crop_img(_hwc(sample.gt))
        assert (record.task, record.name) == (sample.task, sample.name)
        assert (record.height, record.width) == lq.shape[:2] == CROPPED[sample.name]
        # The network restores the cropped degraded image.
        x = torch.from_numpy(lq).permute(2, 0, 1)[None].float()
        with torch.no_grad():
            expected = [model(x).clamp(0, 1)[0], model.refine(x, steps=1).clamp(0, 1)[0]]
        outputs = evaluation.outputs[(sample.task, sample.name)]
        for output, reference in zip(outputs, expected):
            assert output.dtype == torch.float32
            torch.testing.assert_close(output, reference)
        assert (record.input_psnr, record.input_ssim) == pytest.approx(promptir_reference(lq, gt), rel=1e-12)
        for step, output in enumerate(outputs):
            assert (record.psnr[step], record.ssim[step]) == pytest.approx(
                promptir_reference(_hwc(output), gt), rel=1e-12)
    for task_scores, record in zip(evaluation.scores, evaluation.images):   # one image per task
        assert task_scores.images == 1 and task_scores.psnr == record.psnr and task_scores.ssim == record.ssim
    average = evaluation.average()
    assert average.images == 2
    assert average.psnr[1] == pytest.approx(sum(r.psnr[1] for r in evaluation.images) / 2)


def test_table_and_dictionary(promptir_run):
    _, evaluation, _ = promptir_run
    table = format_table(evaluation)
    assert "step 0 (plain)" in table and "step 1" in table and "average" in table and "noise25" in table
    report = evaluation.to_dict()
    assert report["protocol"] == {"name": "promptir", "crop_border": 0, "y_channel": False, "pad_to": 8}
    assert [t["task"] for t in report["tasks"]] == ["noise25", "haze"]
    assert len(report["average"]["psnr"]) == 2
    assert [(r["name"], r["height"], r["width"]) for r in report["images"]] == [("a.png", 32, 48),
                                                                                ("sub/b.png", 32, 32)]


def test_saved_pngs_reproduce_the_promptir_scores(promptir_run):
    """The saved 8-bit PNG differs from the scored float output by at most 1/510 per value. By
    the triangle inequality the RMSE against the clean image then moves by at most 1/510, which
    is what is asserted for PSNR (RMSE = 10^(-PSNR/20)). SSIM has no bound as simple: the change
    measured on these images is under 1e-4, asserted within 1e-3."""
    samples, evaluation, folder = promptir_run
    for sample, record in zip(samples, evaluation.images):
        gt = _crop_img(_hwc(sample.gt))
        stem = sample.name.rsplit(".", 1)[0]
        for step in range(2):
            pixels = _read_png(folder / sample.task / f"{stem}_step{step}.png")
            assert pixels.shape == gt.shape
            kept = evaluation.outputs[(sample.task, sample.name)][step]
            assert np.abs(pixels / 255.0 - _hwc(kept)).max() <= 1 / 510 + 1e-6
            png_psnr, png_ssim = promptir_reference(pixels / 255.0, gt)
            assert abs(10 ** (-png_psnr / 20) - 10 ** (-record.psnr[step] / 20)) <= 1 / 510
            assert png_ssim == pytest.approx(record.ssim[step], abs=1e-3)


def test_csv_holds_one_row_per_image(promptir_run, tmp_path):
    _, evaluation, _ = promptir_run
    path = tmp_path / "scores.csv"
    write_csv(evaluation, path)
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header = ["task", "image", "height", "width", "input_psnr", "input_ssim",
              "step0_psnr", "step0_ssim", "step1_psnr", "step1_ssim"]
    assert rows[0] == header == csv_columns(1)
    assert len(rows) == 3
    for row, record in zip(rows[1:], evaluation.images):
        assert row[:4] == [record.task, record.name, str(record.height), str(record.width)]
        values = [float(v) for v in row[4:]]
        assert values == [record.input_psnr, record.input_ssim, record.psnr[0], record.ssim[0],
                          record.psnr[1], record.ssim[1]]   # exact: full precision

    with pytest.raises(OutputExistsError, match="scores.csv exists") as refused:
        write_csv(evaluation, path)
    assert isinstance(refused.value, FileExistsError) and isinstance(refused.value, EvaluationError)
    path.write_text("someone else's")
    with pytest.raises(OutputExistsError):
        write_csv(evaluation, path)
    assert path.read_text() == "someone else's"
    write_csv(evaluation, path, overwrite=True)
    assert path.read_text().splitlines()[0] == ",".join(header)
    with pytest.raises(EvaluationError, match="does not exist"):
        write_csv(evaluation, tmp_path / "missing" / "scores.csv")
    with pytest.raises(EvaluationError, match="is a folder"):
        write_csv(evaluation, tmp_path)


def test_basicsr_protocol_matches_a_transcription_of_basicsr(model, tmp_path):
    samples = _make_samples()
    folder = tmp_path / "images"
    evaluation = evaluate(model, samples, steps=2, protocol="basicsr", crop_border=3, y_channel=True,
                          keep_outputs=True, save_images=folder)
    rgb = evaluate(model, samples, steps=0, protocol="basicsr", crop_border=3)
    assert rgb.to_dict()["protocol"] == {"name": "basicsr", "crop_border": 3, "y_channel": False, "pad_to": 8}
    # BasicSR rounds Y to float32 (about 1e-6 dB); on RGB the arithmetic is the same up to float64 rounding.
    y_tolerance, rgb_tolerance = dict(psnr=1e-5, ssim=1e-7), dict(psnr=1e-9, ssim=1e-10)

    def assert_scores(psnr, ssim, reference, tolerance):
        assert psnr == pytest.approx(reference[0], abs=tolerance["psnr"])
        assert ssim == pytest.approx(reference[1], abs=tolerance["ssim"])

    for sample, record, rgb_record in zip(samples, evaluation.images, rgb.images):
        h, w = sample.lq.shape[1:]
        assert (record.height, record.width) == (h, w)   # whole images
        # Padded (reflect) to multiples of 8 once, cropped back; step t is model.refine(x, steps=t).
        x = sample.lq[None]
        padded = F.pad(x, (0, (-w) % 8, 0, (-h) % 8), mode="reflect")
        with torch.no_grad():
            expected = [model(padded)[..., :h, :w]] + [model.refine(x, steps=t) for t in (1, 2)]
        expected = [image.clamp(0, 1)[0] for image in expected]
        outputs = evaluation.outputs[(sample.task, sample.name)]
        assert len(outputs) == 3 and not torch.equal(outputs[1], outputs[2])
        assert_scores(record.input_psnr, record.input_ssim, basicsr_reference(sample.lq, sample.gt, 3, True),
                      y_tolerance)
        assert_scores(rgb_record.input_psnr, rgb_record.input_ssim,
                      basicsr_reference(sample.lq, sample.gt, 3, False), rgb_tolerance)
        assert_scores(rgb_record.psnr[0], rgb_record.ssim[0], basicsr_reference(outputs[0], sample.gt, 3, False),
                      rgb_tolerance)
        stem = sample.name.rsplit(".", 1)[0]
        for step, (output, reference) in enumerate(zip(outputs, expected)):
            torch.testing.assert_close(output, reference)
            assert_scores(record.psnr[step], record.ssim[step], basicsr_reference(output, sample.gt, 3, True),
                          y_tolerance)
            # The PNG holds the quantised image that was scored: its scores are the reported ones.
            pixels = torch.from_numpy(_read_png(folder / sample.task / f"{stem}_step{step}.png").copy())
            assert_scores(record.psnr[step], record.ssim[step],
                          basicsr_reference(pixels.permute(2, 0, 1) / 255.0, sample.gt, 3, True), y_tolerance)


def test_pad_to_16_is_sipls_released_test(model):
    """SIPLModel.test pads (reflect) to multiples of 16 once and iterates on the padded image."""
    samples = _make_samples(("sub/b.png",))
    sixteen = evaluate(model, samples, steps=1, protocol="basicsr", pad_to=16, keep_outputs=True)
    eight = evaluate(model, samples, steps=0, protocol="basicsr", keep_outputs=True)
    x = samples[0].lq[None]
    padded = F.pad(x, (0, (-45) % 16, 0, (-37) % 16), mode="reflect")
    with torch.no_grad():
        expected = [model(padded)[..., :37, :45], model.refine(x, steps=1, pad_to=16)]
    outputs = sixteen.outputs[("haze", "sub/b.png")]
    for output, reference in zip(outputs, expected):
        torch.testing.assert_close(output, reference.clamp(0, 1)[0])
    assert not torch.equal(outputs[0], eight.outputs[("haze", "sub/b.png")][0])
    assert sixteen.to_dict()["protocol"]["pad_to"] == 16


class _CountingPasses:
    def __init__(self, model):
        self.calls = 0
        self.handle = model.register_forward_hook(self._count)

    def _count(self, *_):
        self.calls += 1


def test_existing_targets_are_refused_before_any_work(model, tmp_path):
    samples = _make_samples()
    folder = tmp_path / "images"
    taken = folder / "haze" / "sub" / "b_step1.png"
    taken.parent.mkdir(parents=True)
    taken.write_bytes(b"not ours")
    passes = _CountingPasses(model)
    try:
        with pytest.raises(OutputExistsError, match="b_step1.png exists") as refused:
            evaluate(model, samples, steps=1, save_images=folder)
        assert isinstance(refused.value, FileExistsError)
        assert passes.calls == 0
        assert sorted(p for p in folder.rglob("*") if p.is_file()) == [taken]
        assert taken.read_bytes() == b"not ours"
        # Two samples that would write one file: refused as well.
        twins = _make_samples(("c.png", "c.jpg"))
        with pytest.raises(EvaluationError, match="would both be saved as .*c_step0.png"):
            evaluate(model, twins, steps=1, save_images=tmp_path / "twins")
        assert passes.calls == 0 and not (tmp_path / "twins").exists()
        evaluate(model, samples, steps=1, save_images=folder, overwrite=True)
        assert passes.calls > 0
    finally:
        passes.handle.remove()
    assert _read_png(taken).shape == (32, 32, 3)


def test_bfloat16_is_measured_and_close_to_float32(model, promptir_run):
    samples, float32, _ = promptir_run
    bf16 = evaluate(model, samples[:1], steps=1, dtype=torch.bfloat16, keep_outputs=True)
    key = (samples[0].task, samples[0].name)
    for step in range(2):
        low, full = bf16.outputs[key][step], float32.outputs[key][step]
        assert low.dtype == torch.float32
        assert not torch.equal(low, full)   # the plain pass runs in bfloat16 too
        assert (low - full).abs().max() < 0.05
        assert bf16.images[0].psnr[step] == pytest.approx(float32.images[0].psnr[step], abs=0.2)
        assert bf16.images[0].ssim[step] == pytest.approx(float32.images[0].ssim[step], abs=0.01)


def test_refinement_steps_need_proxy_fusion():
    torch.manual_seed(0)
    plain = PromptIR.from_preset("tiny").eval()
    samples = _make_samples(("a.png",))
    with pytest.raises(ValueError, match="Proxy Fusion"):
        evaluate(plain, samples, steps=1)
    evaluation = evaluate(plain, samples, steps=0)
    assert len(evaluation.images[0].psnr) == 1 and math.isfinite(evaluation.images[0].psnr[0])


def test_bad_options_and_samples_fail_with_one_clear_error(model):
    samples = _make_samples(("a.png",))
    for options, message in [(dict(crop_border=3), "options of the basicsr protocol"),
                             (dict(y_channel=True), "options of the basicsr protocol"),
                             (dict(protocol="matlab"), "protocol must be one of promptir, basicsr"),
                             (dict(dtype=torch.float16), "float16 evaluation needs CUDA"),
                             (dict(dtype=torch.int8), "dtype must be one of"),
                             (dict(steps=-1), "steps must be a non-negative int"),
                             (dict(pad_to=12), "pad_to must be a positive multiple of 8")]:
        with pytest.raises(EvaluationError, match=message):
            evaluate(model, samples, **options)
    with pytest.raises(EvaluationError, match="no samples"):
        evaluate(model, [])
    gt = torch.rand(3, 40, 52)
    with pytest.raises(EvaluationError, match=r"sample 0 \(noise25: x.png\): the degraded image is \(40, 48\)"):
        evaluate(model, [EvalSample("noise25", "x.png", gt[:, :, :48], gt)], steps=0)
    with pytest.raises(EvaluationError, match="x.png.*12x40 has no 16x16 centre crop"):
        evaluate(model, [EvalSample("noise25", "x.png", gt[:, :12, :40], gt[:, :12, :40])], steps=0)
    with pytest.raises(EvaluationError, match="without a border of 15 is smaller than the 11-pixel"):
        evaluate(model, samples, steps=0, protocol="basicsr", crop_border=15)


class _LazySamples(Sequence):
    """Builds each sample when indexed and checks that no earlier one is still alive then."""

    def __init__(self, count: int):
        self.count, self.alive, self.built = count, weakref.WeakSet(), 0

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> EvalSample:
        if not 0 <= index < self.count:
            raise IndexError(index)
        gc.collect()
        assert len(self.alive) == 0, "an earlier sample's images are still alive"
        sample = _make_samples((f"img{index}.png",), seed=index)[0]
        self.alive.add(sample.lq)
        self.alive.add(sample.gt)
        self.built += 1
        return sample


def test_samples_are_indexed_one_at_a_time_and_dropped(model, tmp_path):
    samples = _LazySamples(3)
    evaluation = evaluate(model, samples, steps=0, save_images=tmp_path / "images")
    assert samples.built == 6   # once to check the targets, once to evaluate
    assert [r.name for r in evaluation.images] == ["img0.png", "img1.png", "img2.png"]
    assert evaluation.scores[0].images == 3

"""The sipl-fast command line (restore, eval, info, errors) and the image files it reads and writes."""
import hashlib
import json
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from sipl_fast import SIPLPromptIR
from sipl_fast.checkpoint import save_weights
from sipl_fast.cli import main
from sipl_fast.images import PNG_SIGNATURE, encode_png16, read_image, write_png


# --------------------------------------------------------------------------- image files
def _filtered_png16(pixels: np.ndarray, filters: list[int]) -> bytes:
    """A 16-bit PNG whose rows use the given filter types (an independent encoder for the test)."""
    height, width, channels = pixels.shape
    bpp = 2 * channels
    rows = pixels.astype(">u2").reshape(height, width * channels).view(np.uint8).astype(np.int64)
    raw = bytearray()
    for y in range(height):
        row = rows[y]
        prior = rows[y - 1] if y else np.zeros_like(row)
        left = np.concatenate([np.zeros(bpp, np.int64), row[:-bpp]])
        upper_left = np.concatenate([np.zeros(bpp, np.int64), prior[:-bpp]])
        kind = filters[y % len(filters)]
        if kind == 0:
            predicted = np.zeros_like(row)
        elif kind == 1:
            predicted = left
        elif kind == 2:
            predicted = prior
        elif kind == 3:
            predicted = (left + prior) // 2
        else:
            p = left + prior - upper_left
            pa, pb, pc = np.abs(p - left), np.abs(p - prior), np.abs(p - upper_left)
            predicted = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prior, upper_left))
        raw += bytes([kind]) + ((row - predicted) % 256).astype(np.uint8).tobytes()

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    colour = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    return (PNG_SIGNATURE + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, colour, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(bytes(raw))) + chunk(b"IEND", b""))


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_png16_decoder_handles_every_row_filter(channels, tmp_path):
    rng = np.random.default_rng(channels)
    pixels = rng.integers(0, 65536, size=(9, 13, channels), dtype=np.uint16)
    (tmp_path / "x.png").write_bytes(_filtered_png16(pixels, filters=[0, 1, 2, 3, 4, 4, 3, 1, 2]))
    (tmp_path / "y.png").write_bytes(encode_png16(pixels))
    for name in ("x.png", "y.png"):
        image = read_image(tmp_path / name)
        planes = [image.rgb[:1] if image.grayscale else image.rgb] + ([image.alpha] if image.alpha is not None else [])
        got = np.round(torch.cat(planes).permute(1, 2, 0).numpy() * 65535).astype(np.uint16)
        assert image.bit_depth == 16 and image.grayscale == (channels <= 2) and np.array_equal(got, pixels)


def test_png16_matches_pillow_for_grayscale(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 65536, size=(30, 41), dtype=np.uint16)
    Image.fromarray(pixels).save(tmp_path / "g.png")            # Pillow: 16-bit gray, adaptive filters
    image = read_image(tmp_path / "g.png")
    assert image.bit_depth == 16 and image.grayscale and image.alpha is None
    assert np.array_equal(np.round(image.rgb[0].numpy() * 65535).astype(np.uint16), pixels)


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA", "P"])
def test_eight_bit_round_trip(mode, tmp_path):
    rng = np.random.default_rng(1)
    array = rng.integers(0, 256, size=(12, 17, 4), dtype=np.uint8)
    source = Image.fromarray(array, "RGBA").convert(mode)
    source.save(tmp_path / "in.png")
    image = read_image(tmp_path / "in.png")
    write_png(tmp_path / "out.png", image.rgb, image.alpha, image.grayscale, image.bit_depth)
    with Image.open(tmp_path / "out.png") as written:
        if mode == "P":   # palette images come back as RGB, or RGBA when the file has transparency
            with Image.open(tmp_path / "in.png") as saved:
                expected = saved.convert("RGBA" if "transparency" in saved.info else "RGB")
        else:
            expected = source
        assert written.mode == expected.mode and written.size == (17, 12)
        assert np.array_equal(np.asarray(written), np.asarray(expected))


# --------------------------------------------------------------------------- restore
@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest(), os.stat(path).st_mtime_ns


@pytest.fixture
def inputs(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (301, 451, 3), dtype=np.uint8)).save(folder / "odd.png")
    Image.fromarray(rng.integers(0, 256, (37, 53), dtype=np.uint8)).save(folder / "gray.png")
    Image.fromarray(rng.integers(0, 256, (45, 30, 4), dtype=np.uint8), "RGBA").save(folder / "alpha.png")
    (folder / "deep.png").write_bytes(encode_png16(rng.integers(0, 65536, (29, 35, 3), dtype=np.uint16)))
    Image.fromarray(rng.integers(0, 256, (40, 24, 3), dtype=np.uint8)).save(folder / "photo.jpg", quality=90)
    return folder


def test_restore_keeps_sizes_formats_alpha_and_inputs(inputs, checkpoint, tmp_path, capsys):
    files = sorted(inputs.iterdir())
    before = {p: _digest(p) for p in files}
    out = tmp_path / "out"
    assert main(["restore", *map(str, files), "--checkpoint", str(checkpoint), "--out", str(out),
                 "--refine-steps", "1", "--no-progress"]) == 0
    assert {p: _digest(p) for p in files} == before, "inputs must never change"
    expected = {"odd": ("RGB", (451, 301)), "gray": ("L", (53, 37)), "alpha": ("RGBA", (30, 45)),
                "deep": (None, (35, 29)), "photo": ("RGB", (24, 40))}
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}.png" for n in expected)
    for name, (mode, size) in expected.items():
        with Image.open(out / f"{name}.png") as image:
            assert image.size == size, name
            if mode:
                assert image.mode == mode, name
    deep = read_image(out / "deep.png")
    assert deep.bit_depth == 16 and deep.size == (29, 35) and not deep.grayscale
    alpha_in, alpha_out = read_image(inputs / "alpha.png").alpha, read_image(out / "alpha.png").alpha
    assert torch.equal(alpha_in, alpha_out), "alpha is kept exactly"
    assert "alpha kept" in capsys.readouterr().out


def test_restore_tiled_matches_size(inputs, checkpoint, tmp_path):
    out = tmp_path / "tiled"
    assert main(["restore", str(inputs / "alpha.png"), "--checkpoint", str(checkpoint), "--out", str(out),
                 "--refine-steps", "1", "--tile", "24", "--overlap", "8"]) == 0     # 3 x 2 overlapping tiles
    with Image.open(out / "alpha.png") as image:
        assert image.size == (30, 45) and image.mode == "RGBA"


def test_restore_refuses_to_overwrite_an_input(inputs, checkpoint, capsys):
    before = _digest(inputs / "gray.png")
    code = main(["restore", str(inputs / "gray.png"), "--checkpoint", str(checkpoint), "--out", str(inputs)])
    assert code == 1
    assert "would overwrite an input" in capsys.readouterr().err
    assert _digest(inputs / "gray.png") == before


def test_restore_gives_inputs_sharing_a_name_their_own_outputs(inputs, checkpoint, tmp_path, capsys):
    """photo.jpg and photo.png side by side keep their suffixes in the output names; a folder
    restored recursively keeps its tree, in the input's format with --format same; every step
    with --save-steps; a rerun with --skip-existing writes nothing and says so."""
    Image.open(inputs / "photo.jpg").save(inputs / "photo.png")
    out = tmp_path / "out"
    code = main(["restore", str(inputs / "photo.jpg"), str(inputs / "photo.png"), "--checkpoint", str(checkpoint),
                 "--out", str(out), "--refine-steps", "1", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["photo_jpg.png", "photo_png.png"]
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    Image.open(inputs / "photo.jpg").save(tree / "sub" / "a.jpg")
    Image.open(inputs / "photo.jpg").save(tree / "b.png")
    code = main(["restore", str(tree), "--recursive", "--format", "same", "--save-steps", "--refine-steps", "1",
                 "--checkpoint", str(checkpoint), "--out", str(tmp_path / "tree_out"), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    written = sorted(str(p.relative_to(tmp_path / "tree_out")) for p in (tmp_path / "tree_out").rglob("*.*"))
    assert written == ["b.png", "b_step0.png", "b_step1.png", "sub/a.jpg", "sub/a_step0.jpg", "sub/a_step1.jpg"]
    assert "restored 2 images" in capsys.readouterr().out
    code = main(["restore", str(tree), "--recursive", "--format", "same", "--save-steps", "--refine-steps", "1",
                 "--checkpoint", str(checkpoint), "--out", str(tmp_path / "tree_out"), "--skip-existing",
                 "--no-progress"])
    assert code == 0 and "restored 0 images (2 skipped: outputs exist)" in capsys.readouterr().out


def test_restore_unreadable_input_writes_nothing(inputs, checkpoint, tmp_path, capsys):
    (inputs / "broken.png").write_bytes(b"not an image at all")
    out = tmp_path / "out"
    code = main(["restore", str(inputs / "odd.png"), str(inputs / "broken.png"), "--checkpoint", str(checkpoint),
                 "--out", str(out)])
    assert code == 1 and "broken.png" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("damage", ["truncated", "mismatched"])
def test_bad_checkpoint_one_error_line_no_traceback_no_outputs(inputs, checkpoint, tmp_path, damage):
    bad = tmp_path / "bad.safetensors"
    if damage == "truncated":
        data = checkpoint.read_bytes()
        bad.write_bytes(data[: len(data) // 3])
    else:
        model = SIPLPromptIR.from_preset("tiny", dim=8)
        save_weights(bad, model.state_dict(), SIPLPromptIR.from_preset("tiny").config)
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "sipl_fast", "restore", str(inputs / "odd.png"),
                             "--checkpoint", str(bad), "--out", str(out)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("sipl-fast")]
    assert len(lines) == 1 and str(bad) in lines[0], result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert not out.exists()


@pytest.mark.parametrize("flags, message", [(["--device", "tpu"], "--device: 'tpu' is not a device"),
                                            (["--device", "meta"], "sipl-fast runs on cpu or cuda"),
                                            (["--device", "cpu", "--cuda-graph"], "--cuda-graph needs a CUDA device")])
def test_restore_device_errors_are_one_line_and_write_nothing(inputs, checkpoint, tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    code = main(["restore", str(inputs / "gray.png"), "--checkpoint", str(checkpoint), "--out", str(out), *flags])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("sipl-fast: error: ") and message in err and err.count("\n") == 1
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for CUDA where there is none")
def test_eval_on_an_absent_cuda_device_is_one_error(checkpoint, capsys):
    assert main(["eval", "--checkpoint", str(checkpoint), "--device", "cuda"]) == 1
    assert "CUDA is not available" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(checkpoint), "--device", "cpu", "--cuda-graph"]) == 1
    assert "--cuda-graph needs a CUDA device" in capsys.readouterr().err


@pytest.mark.gpu
def test_cuda_eval_with_a_graph_scores_as_eager_eval(checkpoint, tmp_path):
    scores = {}
    for flags in ([], ["--cuda-graph"]):
        report = tmp_path / f"scores{len(flags)}.json"
        assert main(["eval", "--checkpoint", str(checkpoint), "--data", "skimage", "--tasks", "noise25,haze",
                     "--refine-steps", "2", "--size", "32", "--device", "cuda", "--json", str(report), *flags]) == 0
        scores[len(flags)] = json.loads(report.read_text())["average"]
    assert scores[1]["psnr"] == pytest.approx(scores[0]["psnr"], abs=1e-3)
    assert scores[1]["ssim"] == pytest.approx(scores[0]["ssim"], abs=1e-4)


@pytest.mark.gpu
def test_cuda_restore_with_a_graph_equals_eager_restore(inputs, checkpoint, tmp_path):
    """One captured step replayed over every tile (all of one size) and two files."""
    files = [str(inputs / "odd.png"), str(inputs / "photo.jpg")]
    common = ["--checkpoint", str(checkpoint), "--refine-steps", "2", "--tile", "64", "--overlap", "16", "--device", "cuda"]
    assert main(["restore", *files, "--out", str(tmp_path / "eager"), *common]) == 0
    assert main(["restore", *files, "--out", str(tmp_path / "graph"), "--cuda-graph", *common]) == 0
    for name in ("odd.png", "photo.png"):
        eager, graph = (read_image(tmp_path / run / name).rgb for run in ("eager", "graph"))
        assert (eager - graph).abs().max() <= 2.5 / 255, name  # 8-bit outputs: rounding may flip a level or two


def test_restore_rejects_bad_tiles(inputs, checkpoint, tmp_path, capsys):
    code = main(["restore", str(inputs / "odd.png"), "--checkpoint", str(checkpoint), "--out", str(tmp_path),
                 "--tile", "100"])
    assert code == 1 and "--tile must be a multiple of 8" in capsys.readouterr().err


# --------------------------------------------------------------------------- eval and info
def test_eval_prints_a_table_per_task_and_step(checkpoint, tmp_path, capsys):
    report = tmp_path / "scores.json"
    assert main(["eval", "--checkpoint", str(checkpoint), "--data", "skimage", "--tasks", "noise25,haze",
                 "--refine-steps", "1", "--size", "32", "--json", str(report), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "noise25" in printed and "haze" in printed and "step 1" in printed and "average" in printed
    assert report.exists()


def test_info(capsys):
    assert main(["info"]) == 0
    printed = capsys.readouterr().out
    assert "extension_loaded" in printed and "backends" in printed


def test_missing_data_folder_is_one_error(checkpoint, tmp_path, capsys):
    code = main(["eval", "--checkpoint", str(checkpoint), "--data", str(tmp_path / "nowhere")])
    assert code == 1 and "nowhere: not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [(["--tasks", "fog"], "--tasks: unknown"),
                                            (["--patch", "12"], "--patch must be a positive multiple of 8"),
                                            (["--iters", "0"], "--iters and --batch must be positive"),
                                            (["--cuda-graph", "--device", "cpu"],
                                             "--cuda-graph needs a single CUDA process"),
                                            (["--device", "tpu"], "--device: 'tpu' is not a device")])
def test_train_option_errors_are_one_line(tmp_path, capsys, flags, message):
    code = main(["train", "--out", str(tmp_path / "run"), "--no-progress", *flags])
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("sipl-fast: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()

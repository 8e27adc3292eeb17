"""The sample and evaluate commands on a tiny trained checkpoint."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest


def test_sample_command_writes_grid_npz_animation(tiny_checkpoint, tmp_path, run_command):
    outs = []
    for name in ("a", "b"):
        r = run_command(
            "diffusion_lab.sample",
            [
                f"ckpt={tiny_checkpoint}",
                "n=6",
                "sampler=ddim",
                "sampler.steps=5",
                "seed=0",
                f"out={tmp_path / name}",
                "animation=true",
            ],
            tmp_path,
        )
        assert r.returncode == 0, r.stderr[-2000:]
        assert "5 network evaluations" in r.stdout
        outs.append(np.load(tmp_path / name / "samples.npz"))
        assert (tmp_path / name / "grid.png").is_file() and (tmp_path / name / "animation.gif").is_file()
    samples = outs[0]["samples"]
    assert samples.shape == (6, 1, 8, 8) and samples.dtype == np.uint8
    assert np.array_equal(samples, outs[1]["samples"]), "same seed, same samples"


def test_sample_command_bad_checkpoint(tmp_path, run_command):
    bad = tmp_path / "broken.ckpt"
    bad.write_bytes(b"not a checkpoint")
    r = run_command("diffusion_lab.sample", [f"ckpt={bad}", "n=2"], tmp_path)
    assert r.returncode != 0 and "unreadable or truncated" in r.stderr and "Traceback" not in r.stderr
    r = run_command("diffusion_lab.sample", [f"ckpt={tmp_path / 'missing.ckpt'}", "n=2"], tmp_path)
    assert r.returncode != 0 and "checkpoint not found" in r.stderr


def test_evaluate_command(tiny_checkpoint, digits_classifier, tmp_path, run_command):
    out = tmp_path / "eval.json"
    r = run_command(
        "diffusion_lab.evaluate",
        [
            f"ckpt={tiny_checkpoint}",
            "metrics=[fid_classifier,kid,class_histogram,bpd]",
            "n=40",
            "sampler=ddim",
            "sampler.steps=5",
            f"classifier_path={digits_classifier}",
            "bpd_n=6",
            f"out={out}",
        ],
        tmp_path,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["n"] == 40 and res["nfe"] == 5
    assert res["fid_classifier"] > 0 and math.isfinite(res["kid_classifier"])
    assert sum(res["class_histogram"]) == 40
    assert 0 < res["bpd"] < 200 and res["bpd_stderr"] > 0 and res["bpd_images"] == 6
    assert "FID (classifier features)" in r.stdout
    r = run_command("diffusion_lab.evaluate", [f"ckpt={tiny_checkpoint}", "metrics=[fid]"], tmp_path)
    assert r.returncode != 0 and "ambiguous" in r.stderr


def test_train_classifier_command(tmp_path, run_command):
    clf = tmp_path / "clf.pt"
    r = run_command(
        "diffusion_lab.evaluate",
        [
            "train_classifier",
            "dataset=digits",
            "dataset.image_size=8",
            "metrics.classifier_epochs=1",
            f"metrics.classifier_path={clf}",
            f"paths.cache_dir={tmp_path}/cache",
        ],
        tmp_path,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert clf.is_file() and "test accuracy" in r.stdout


@pytest.mark.parametrize(
    "command, args, dataset",
    [
        ("diffusion_lab.metrics.train_classifier", ["dataset=digits", "--help"], "digits"),
        ("diffusion_lab.data.preview", ["dataset=mnist", "-h"], "mnist"),
    ],
)
def test_help_of_the_dataset_commands(tmp_path, run_command, command, args, dataset):
    """Hydra's help: the usage, the dataset choices and the composed config; exit 0; nothing run."""
    r = run_command(command, args, tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "usage: python -m " in r.stdout and "dataset: " in r.stdout and "digits" in r.stdout
    assert "_target_: diffusion_lab.data.DiffusionDataModule" in r.stdout
    assert f"name: {dataset}" in r.stdout, "the config composed with the given overrides"
    assert not list(tmp_path.glob("*.png")), "help writes nothing"


def test_small_commands_are_hydra_commands(tmp_path, run_commands):
    """phema, summarize, preview and train_classifier take key=value options and print Hydra's help; a missing
    or bad option ends in one line naming it (the seven commands in one process, ``run_commands``)."""
    helps = (
        ("diffusion_lab.phema", "sigma_rel"),
        ("diffusion_lab.summarize", "metric"),
        ("diffusion_lab.data.preview", "per_class"),
        ("diffusion_lab.metrics.train_classifier", "classifier_epochs"),
    )
    runs = run_commands(
        [(command, ["--help"]) for command, _ in helps]
        + [
            ("diffusion_lab.summarize", [f"dir={tmp_path / 'none'}"]),
            ("diffusion_lab.phema", [f"run_dir={tmp_path}", "sigma_rel=abc"]),
            ("diffusion_lab.summarize", [f"dir={tmp_path}", "--metric", "val/loss"]),
        ],
        tmp_path,
    )
    for (command, key), r in zip(helps, runs, strict=False):
        assert r.returncode == 0 and f"usage: python -m {command}" in r.stdout and key in r.stdout, r.stdout
    r = runs[4]
    assert r.returncode == 1 and r.stderr.startswith("error: multirun folder not found"), r.stderr
    r = runs[5]
    assert r.returncode == 1 and r.stderr.startswith("error: sigma_rel='abc' is not a number"), r.stderr
    r = runs[6]
    assert r.returncode != 0 and "Traceback" not in r.stderr

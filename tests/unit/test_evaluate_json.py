"""The evaluate command's JSON names its checkpoint relative to the JSON file, not by an absolute path."""

from __future__ import annotations

import json
import shutil

from omegaconf import OmegaConf

from diffusion_lab.evaluate import write_results


def test_checkpoint_paths_are_relative_to_the_json(tmp_path, monkeypatch):
    run = tmp_path / "home" / "alice" / "runs" / "r1"
    ckpt = run / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"weights")
    cases = {
        run / "checkpoints" / "last.ddim10-n8.eval.json": "last.ckpt",  # the default: beside the checkpoint
        run / "evals" / "e.json": "../checkpoints/last.ckpt",
    }
    monkeypatch.chdir(run)
    for out, expected in cases.items():
        out.parent.mkdir(exist_ok=True)
        results = {"checkpoint": str(ckpt.resolve()), "fid_classifier": 1.5}
        write_results(results, OmegaConf.create({"ckpt": "checkpoints/last.ckpt", "n": 8}), out)
        data = json.loads(out.read_text())
        assert data["checkpoint"] == expected and data["config"]["ckpt"] == expected
        assert data["fid_classifier"] == 1.5 and results["checkpoint"] == str(ckpt.resolve()), "input kept"
        assert str(tmp_path) not in out.read_text(), "no absolute path"
    moved = tmp_path / "elsewhere"
    shutil.move(run, moved)
    out = moved / "evals" / "e.json"
    assert (out.parent / json.loads(out.read_text())["checkpoint"]).resolve() == (
        moved / "checkpoints" / "last.ckpt"
    ).resolve()

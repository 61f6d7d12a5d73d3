"""The model shipped in models/: it loads through the user's command on a fresh clone and clears World 1-1."""

import os

import torch
from helpers import ROOT, run_script

MODEL = os.path.join("models", "SuperMarioBros-1-1-v0.pt")


def test_shipped_model_is_a_small_evaluation_file():
    model = torch.load(os.path.join(ROOT, MODEL), weights_only=True)
    assert model["env_id"] == "SuperMarioBros-1-1-v0" and model["action_set"] == "right_only"
    assert "optimizer" not in model and os.path.getsize(os.path.join(ROOT, MODEL)) < 10 * 2**20


def test_shipped_model_clears_1_1(tmp_path):
    video = tmp_path / "clear.gif"
    result = run_script("ppo_mario.py", "--eval-checkpoint", MODEL, "--eval-episodes", "3", "--video-path", str(video))
    assert result.returncode == 0, result.stderr
    assert "SuperMarioBros-1-1-v0: 3 greedy episodes, cleared 3/3 (100%)" in result.stdout
    assert video.stat().st_size > 100_000  # the whole stage, not a few frames

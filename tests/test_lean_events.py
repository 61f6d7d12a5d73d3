"""benchmark/lean_events.py: a lean copy keeps every other event exactly and none of the dropped tags."""

import os

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from benchmark import lean_events


def read(run_dir):
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    scalars = {tag: [(e.wall_time, e.step, e.value) for e in accumulator.Scalars(tag)]
               for tag in accumulator.Tags()["scalars"]}
    text = {tag: [e.tensor_proto.string_val for e in accumulator.Tensors(tag)] for tag in accumulator.Tags()["tensors"]}
    return scalars, text


def test_the_copy_drops_the_tags_and_keeps_everything_else(tmp_path):
    run, copy = tmp_path / "run", tmp_path / "copy"
    for part in range(2):  # a resumed run writes a second file
        writer = SummaryWriter(str(run), filename_suffix=f".{part}")
        if part == 0:
            writer.add_text("hyperparameters", "|param|value|\n|-|-|\n|gamma|0.98|")
        for episode in range(50):
            step = 1000 * part + 10 * episode
            writer.add_scalar("mario/max_x_pos", 400 + episode + part, step, walltime=1e9 + step / 3)
            writer.add_scalar("mario/x_pos", 300 + episode, step, walltime=1e9 + step / 3)
            writer.add_scalar("mario/episode_flag_get", float(episode % 7 == 0), step, walltime=1e9 + step / 3)
        writer.close()

    names = lean_events.copy_lean(str(run), str(copy), ["mario/x_pos"])

    assert names == sorted(os.listdir(run)) == sorted(os.listdir(copy))
    scalars, text = read(run)
    lean_scalars, lean_text = read(copy)
    assert "mario/x_pos" in scalars and "mario/x_pos" not in lean_scalars
    del scalars["mario/x_pos"]
    assert lean_scalars == scalars and len(scalars["mario/max_x_pos"]) == 100
    assert lean_text == text and text
    assert sum(os.path.getsize(copy / n) for n in names) < sum(os.path.getsize(run / n) for n in names)


def test_a_directory_without_events_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="has no TensorBoard event files"):
        lean_events.copy_lean(str(tmp_path), str(tmp_path / "copy"), ["mario/x_pos"])
    assert not (tmp_path / "copy").exists()

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


def test_max_points_thins_each_scalar_tag_over_the_whole_run_and_keeps_the_text(tmp_path):
    run, copy = tmp_path / "run", tmp_path / "copy"
    for part in range(2):  # a resumed run: the points kept are spaced over both files
        writer = SummaryWriter(str(run), filename_suffix=f".{part}")
        if part == 0:
            writer.add_text("hyperparameters", "|param|value|\n|-|-|\n|gamma|0.98|")
        for episode in range(60):
            step = 1000 * part + 10 * episode
            writer.add_scalar("mario/max_x_pos", 400 + episode + part, step)
            writer.add_scalar("mario/episode_flag_get", float(episode % 7 == 0), step)
            writer.add_text("notes", f"episode {episode}", step)  # not a scalar: all 120 kept, though more than N
            if episode % 10 == 0:
                writer.add_scalar("losses/entropy", 1.5 - step / 1e4, step)  # 12 points: fewer than N, all kept
        writer.close()

    lean_events.copy_lean(str(run), str(copy), [], max_points=25)

    scalars, text = read(run)
    lean_scalars, lean_text = read(copy)
    assert lean_text == text and len(text["notes/text_summary"]) == 120
    assert lean_scalars["losses/entropy"] == scalars["losses/entropy"]
    for tag in ["mario/max_x_pos", "mario/episode_flag_get"]:
        points, kept = scalars[tag], lean_scalars[tag]
        assert len(points) == 120 and len(kept) == 25
        assert kept[0] == points[0] and kept[-1] == points[-1]
        assert set(kept) <= set(points)
        assert 1000 <= kept[12][1] < 1100  # the middle point comes from the second file
    # the same episodes for both per-episode tags, so mario_windows.py still pairs them
    assert [p[1] for p in lean_scalars["mario/max_x_pos"]] == [p[1] for p in lean_scalars["mario/episode_flag_get"]]


def test_a_directory_without_events_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="has no TensorBoard event files"):
        lean_events.copy_lean(str(tmp_path), str(tmp_path / "copy"), ["mario/x_pos"])
    assert not (tmp_path / "copy").exists()

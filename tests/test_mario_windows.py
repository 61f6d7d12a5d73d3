"""benchmark/mario_windows.py on real TensorBoard event files with known episodes."""

import csv

import pytest
from torch.utils.tensorboard import SummaryWriter

from benchmark import mario_windows


def write_episodes(path, episodes, per_episode_flag=True):
    """episodes: (step, max_x_pos, x_pos, flag) as ppo_mario.py logs them."""
    writer = SummaryWriter(str(path))
    for step, max_x, x, flag in episodes:
        writer.add_scalar("mario/max_x_pos", max_x, step)
        writer.add_scalar("mario/x_pos", x, step)
        if per_episode_flag:
            writer.add_scalar("mario/episode_flag_get", float(flag), step)
    writer.close()


# Window 100: steps 50 and 100 fall in the first (0, 100], 150 and 250 in the next two.
EPISODES = [(50, 400, 300, False), (100, 3161, 3161, True), (150, 1000, 900, False), (250, 3161, 3161, True),
            (260, 2000, 2000, False)]


def test_rows_per_window_and_first_flag(tmp_path):
    write_episodes(tmp_path, EPISODES)
    [(_, rows, first_flag)] = mario_windows.main([str(tmp_path), "--window", "100"])
    assert [(r["start"], r["end"], r["episodes"]) for r in rows] == [(0, 100, 2), (100, 200, 1), (200, 260, 2)]
    assert [r["mean_max_x_pos"] for r in rows] == [pytest.approx(1780.5), 1000, pytest.approx(2580.5)]
    assert [r["furthest_x_pos"] for r in rows] == [3161, 1000, 3161]
    assert [r["flag_rate"] for r in rows] == [0.5, 0.0, 0.5]
    assert first_flag == 100


def test_episodes_past_a_wall_are_counted_per_window(tmp_path):
    write_episodes(tmp_path, EPISODES)
    [(_, rows, _)] = mario_windows.main([str(tmp_path), "--window", "100", "--past", "1000"])
    assert [r["past"] for r in rows] == [1, 0, 2]  # 1000 itself is not past it


def test_older_runs_need_the_flag_position(tmp_path):
    write_episodes(tmp_path, EPISODES, per_episode_flag=False)
    with pytest.raises(SystemExit) as exit_info:
        mario_windows.main([str(tmp_path)])
    assert "--flag-x" in str(exit_info.value)
    [(_, rows, first_flag)] = mario_windows.main([str(tmp_path), "--window", "100", "--flag-x", "3161"])
    assert [r["flag_rate"] for r in rows] == [0.5, 0.0, 0.5] and first_flag == 100


def test_a_live_run_whose_file_ends_between_an_episodes_tags_is_read_up_to_it(tmp_path):
    write_episodes(tmp_path, EPISODES)
    writer = SummaryWriter(str(tmp_path))
    writer.add_scalar("mario/max_x_pos", 500, 300)  # the next episode's first tag, its flag not yet written
    writer.close()
    [(_, rows, first_flag)] = mario_windows.main([str(tmp_path), "--window", "100"])
    assert [r["episodes"] for r in rows] == [2, 1, 2] and first_flag == 100


def test_where_the_misses_of_a_span_ended(tmp_path, capsys):
    write_episodes(tmp_path, EPISODES + [(270, 1020, 1000, False), (280, 2049, 2049, False), (290, 2030, 2030, False)])
    # Steps (100, 290]: 150, 250 (a flag: left out), 260, 270, 280, 290. Bins of 50: 1000 (x 1000 and 1020), 2000
    # (2000, 2030 and 2049); the flag episode at step 100 lies outside the span.
    episodes, missed, heaps = mario_windows.where_misses_ended(str(tmp_path), 100, 290)
    assert (episodes, missed, heaps) == (6, 5, [(2000, 3), (1000, 2)])
    mario_windows.main([str(tmp_path), "--window", "100", "--ends", "0", "260"])
    assert "steps 0-260: 5 episodes ended, 3 without the flag" in capsys.readouterr().out
    assert mario_windows.where_misses_ended(str(tmp_path), 0, 300)[2][:2] == [(2000, 3), (1000, 2)]


def test_the_csv_holds_each_runs_rows_and_first_flag(tmp_path):
    first, resumed = tmp_path / "run-a", tmp_path / "run-b"
    write_episodes(first, EPISODES)
    write_episodes(resumed, [(1150, 900, 900, False), (1250, 3161, 3161, True)])
    csv_path = tmp_path / "probe.csv"
    runs = mario_windows.main([str(first), str(resumed), "--window", "100", "--csv", str(csv_path)])

    lines = csv_path.read_text().splitlines()
    assert lines[:2] == ["# run-a: first flag at step 100, last episode at step 260",
                         "# run-b: first flag at step 1250, last episode at step 1250"]
    table = list(csv.DictReader(lines[2:]))
    assert [row["run"] for row in table] == ["run-a"] * 3 + ["run-b"] * 2
    assert [(int(row["start"]), int(row["end"]), int(row["episodes"]), int(row["flags"])) for row in table] == [
        (0, 100, 2, 1), (100, 200, 1, 0), (200, 260, 2, 1), (1100, 1200, 1, 0), (1200, 1250, 1, 1)]
    expected = [row for _, rows, _ in runs for row in rows]
    for column in ["flag_rate", "mean_max_x_pos", "furthest_x_pos"]:
        assert [float(row[column]) for row in table] == [pytest.approx(row[column]) for row in expected]
    assert float(table[0]["mean_max_x_pos"]) == pytest.approx(1780.5)


def test_a_run_with_start_states_counts_them_and_can_keep_only_the_episodes_from_the_reset_state(tmp_path):
    write_episodes(tmp_path, EPISODES)
    writer = SummaryWriter(str(tmp_path))
    for (step, *_), start in zip(EPISODES, [0, 120, 0, 80, 0]):
        writer.add_scalar("mario/episode_start_step", start, step)
    writer.close()
    [(_, rows, first_flag)] = mario_windows.main([str(tmp_path), "--window", "100"])
    assert [(r["from_start_states"], r["mean_start_step"]) for r in rows] == [(1, 120), (0, 0), (1, 80)]
    assert first_flag == 100
    [(_, rows, first_flag)] = mario_windows.main([str(tmp_path), "--window", "100", "--from-reset"])
    assert [(r["episodes"], r["flag_rate"]) for r in rows] == [(1, 0.0), (1, 0.0), (1, 0.0)]  # both flags were from one
    assert first_flag is None and "from_start_states" not in rows[0]
    assert mario_windows.where_misses_ended(str(tmp_path), 0, 300, from_reset=True)[:2] == (3, 3)

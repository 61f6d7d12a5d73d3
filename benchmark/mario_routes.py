"""What the reward pays for recorded routes through a stage, with and without --pay-skipped-ground.

A route file holds joypad action lists, each replayed from the reset state of the stage on the real emulator (it is
deterministic, so a replay plays the recorded episode again). For each route and setting: the episode's length, how
it ended, its max x_pos, the shaped return the agent learns from, and where and how much ground a pipe skipped. The
1-2 routes are two greedy episodes of the 1-2 `simple` probe's 1,187,840 checkpoint: the exit pipe to the flag, and
the ceiling above the Warp Zone to the stuck time-out.

    python benchmark/mario_routes.py    # tests/data/mario_1-2_routes.json on SuperMarioBros-1-2-v0, simple actions
"""

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import ppo_mario  # noqa: E402


def replay(args: ppo_mario.Args, actions: list[int]) -> dict:
    env = ppo_mario.make_env(args)()
    env.reset(seed=0)
    shaped_return, skipped, skips, x_pos = 0.0, 0, [], None
    for step, action in enumerate(actions, 1):
        _, reward, terminated, truncated, info = env.step(action)
        shaped_return += reward
        if info["skipped_x"]:
            skipped += info["skipped_x"]
            skips.append(f"{x_pos} → {info['x_pos']}")
        x_pos = info["x_pos"]
        if terminated or truncated:
            break
    env.close()
    end = "flag" if info["flag_get"] else "death" if terminated else "stuck time-out" if truncated else "not over"
    return {"steps": step, "end": end, "max_x_pos": info["max_x_pos"], "shaped_return": shaped_return,
            "skipped_x": skipped, "skips": ", ".join(skips) or "none"}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("routes", nargs="?", default=os.path.join(ROOT, "tests", "data", "mario_1-2_routes.json"))
    parser.add_argument("--env-id", default="SuperMarioBros-1-2-v0")
    parser.add_argument("--action-set", default="simple", choices=["right_only", "simple", "complex"])
    options = parser.parse_args()
    if ppo_mario.is_gymnasium_native():
        sys.exit("error: --pay-skipped-ground is a 7.4-line option; run this with gym-super-mario-bros 7.4 "
                 "(Python < 3.13)")
    with open(options.routes) as f:
        routes = json.load(f)
    print("| route | pay skipped ground | steps | end | max x_pos | skips (x before → after) | skipped x "
          "| shaped return |\n|-|-|-|-|-|-|-|-|")
    for name, actions in routes.items():
        for pay in (False, True):
            args = ppo_mario.Args(env_id=options.env_id, action_set=options.action_set, pay_skipped_ground=pay)
            r = replay(args, actions)
            print(f"| {name} | {'on' if pay else 'off'} | {r['steps']} | {r['end']} | {r['max_x_pos']} | "
                  f"{r['skips']} | {r['skipped_x']} | {r['shaped_return']:.1f} |")


if __name__ == "__main__":
    main()

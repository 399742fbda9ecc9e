"""Run `docrl train` and SIGKILL its driver at one point of one training step.

    python tests/kill_driver.py POINT STEP RECORD -- train [--resume] [KEY=VALUE ...]

POINT is where in step STEP the process dies:

    rollout     answers are being generated (the rollout workers hold the requests)
    reward      the answers are being scored (the reward actors hold them)
    update      the learner ranks are in the step's update
    push        the new weights are on their way to the rollout workers
    checkpoint  the checkpoint of the step is half written (learner state and policy, no marker)

The driver dies the way `kill -9` or the OOM killer ends it: no handler, no cleanup, no flush.
The kill lands on the driver's first wait for the role's results after the role was handed the
work (so the work is in flight), or right after the checkpoint's policy files are written. Before
dying it writes RECORD (JSON: point, step), so a test can tell this kill from any other death.
The roles are Ray actors of this driver's job: Ray ends them when it sees the driver gone.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path


def arm(point: str, step: int, record: Path) -> None:
    import ray

    import cluster.train as train
    from learner.group import LearnerGroup
    from reward.group import RewardPool
    from rollout.group import RolloutGroup

    in_step: dict[str, int | None] = {"step": None}
    armed = {"now": False}

    def die() -> None:
        record.write_text(json.dumps({"point": point, "step": step}))
        os.kill(os.getpid(), signal.SIGKILL)

    def kill_on_first_wait(wait):
        def waiting(*args, **kwargs):
            if armed["now"]:
                die()
            return wait(*args, **kwargs)
        return waiting

    ray.get, ray.wait = kill_on_first_wait(ray.get), kill_on_first_wait(ray.wait)

    train_step = train.Trainer.train_step

    def tracked_train_step(self, at_step):
        in_step["step"] = at_step
        try:
            return train_step(self, at_step)
        finally:
            in_step["step"] = None

    train.Trainer.train_step = tracked_train_step

    def arm_in(cls, method: str) -> None:
        original = getattr(cls, method)

        def armed_call(self, *args, **kwargs):
            if in_step["step"] == step:
                armed["now"] = True
            return original(self, *args, **kwargs)

        setattr(cls, method, armed_call)

    if point == "checkpoint":
        write_policy = train.write_policy

        def write_policy_then_die(directory, base, weights, at_step, *args, **kwargs):
            out = write_policy(directory, base, weights, at_step, *args, **kwargs)
            if at_step == step:
                die()
            return out

        train.write_policy = write_policy_then_die
    else:
        cls, method = {"rollout": (RolloutGroup, "generate"), "reward": (RewardPool, "collect"),
                       "update": (LearnerGroup, "update"), "push": (RolloutGroup, "_push")}[point]
        arm_in(cls, method)


def main() -> int:
    point, step, record, sep, *argv = sys.argv[1:]
    if sep != "--" or point not in ("rollout", "reward", "update", "push", "checkpoint"):
        raise SystemExit(__doc__)
    arm(point, int(step), Path(record))
    from cluster.cli import main as docrl

    return docrl(argv)


if __name__ == "__main__":
    sys.exit(main())

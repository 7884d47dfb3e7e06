"""The seeded kill schedule and how each component is killed and brought back.

Each kill is `kill -9`; each restart is what docs/operations.md tells an operator to do: `lab power
LAB MACHINE on` for a machine's agent, the same command line again for a service. The schedule is a
shuffled round-robin over the four components, so with 12 kills each one dies 3 times, and a
seed reproduces a failing order.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter
from dataclasses import dataclass
from enum import StrEnum

from siterecovery.demo.environment import Environment
from siterecovery.lab import runtime
from tests.conftest import lab_pid, run_cli


class Component(StrEnum):
    AGENT = "agent"
    PROCESS_SERVER = "process-server"
    MASTER_TARGET = "master-target"
    CONFIGURATION_SERVER = "configuration-server"


@dataclass(frozen=True)
class Kill:
    component: Component
    after_records: int  # let the writer write this many records before the kill


def make_schedule(kills: int, seed: int) -> list[Kill]:
    rng = random.Random(seed)
    order = [list(Component)[i % len(Component)] for i in range(kills)]
    rng.shuffle(order)
    return [Kill(c, rng.randint(8, 40)) for c in order]


def kill_agent(env: Environment, machine: str, site: str = "onprem") -> None:
    pidfile = runtime.run_dir(env.lab_dir, site, machine) / "export.pid"
    pid = lab_pid(pidfile)
    assert pid is not None, f"the agent of {machine} is not running"
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while lab_pid(pidfile) is not None:
        assert time.monotonic() < deadline, "the killed agent did not go away"
        time.sleep(0.02)


@dataclass
class Injector:
    """Kills and restarts the components `web1`'s replication runs through."""

    env: Environment
    machine: str
    process_server: str = "ps-onprem"
    master_target: str = "mt-cloud"

    def __post_init__(self) -> None:
        self.survived: Counter[Component] = Counter()

    def kill_and_restart(self, component: Component) -> None:
        env = self.env
        match component:
            case Component.AGENT:
                kill_agent(env, self.machine)
                run_cli("lab", "power", str(env.lab_dir), self.machine, "on")
            case Component.PROCESS_SERVER:
                env.restart_component(self.process_server)
            case Component.MASTER_TARGET:
                env.restart_component(self.master_target)
            case Component.CONFIGURATION_SERVER:
                env.stop_server(kill=True)
                env.start_server()
        self.survived[component] += 1

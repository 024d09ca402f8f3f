"""How each job of the run matrix runs: its command line, threads, resources and conda env.

The train command (accelerate flags, one srun task per node on several nodes), the evaluation
and toy CLI options, and the `resources:` / `threads:` the Snakemake rules declare, all from the
config's commands, resources and evaluation blocks.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from typing import Any

from cppo.pipeline.config import (
    is_accelerate_launcher,
    model_resources,
    model_schedule,
    model_training,
    train_processes_per_node,
    train_world_size,
)
from cppo.pipeline.matrix import RunMatrix

# Rendezvous port of a multi-node job: offset by the SLURM job id so that two jobs sharing a
# node never collide.
MAIN_PROCESS_PORT_BASE = 29500
# The Ray cluster the verl backend's train command runs in on several nodes.
VERL_RAY_SLURM = "bash cppo/backends/verl/ray_slurm.sh"


def format_cli_args(args: Mapping[str, Any]) -> str:
    """{'n-train': 100, 'fast': True, 'x': None} -> "--n-train 100 --fast" (shell-quoted)."""
    parts: list[str] = []
    for key, value in args.items():
        if value is None or value is False:
            continue
        flag = key if key.startswith("-") else f"--{key}"
        parts.append(flag if value is True else f"{flag} {shlex.quote(str(value))}")
    return " ".join(parts)


class Commands:
    """Command lines and resources of the jobs of one config."""

    def __init__(self, matrix: RunMatrix):
        self.matrix = matrix
        self.cfg = matrix.cfg

    # --- resources ----------------------------------------------------------------------------
    def resources(self, step: str, model: str | None = None) -> dict[str, Any]:
        return model_resources(self.cfg, step, model)

    def threads(self, step: str, model: str | None = None) -> int:
        return int(self.resources(step, model)["threads"])

    def nodes(self, model: str) -> int:
        return int(self.resources("train", model)["nodes"])

    def processes_per_node(self, model: str) -> int:
        """Trainer processes per node (one per GPU under accelerate; 1 on CPU)."""
        return train_processes_per_node(self.cfg, model)

    def world_size(self, model: str) -> int:
        """Trainer processes of one run: nodes x processes per node."""
        return train_world_size(self.cfg, model)

    def threads_per_process(self, model: str) -> int:
        """CPU threads of one trainer process: the job's (per-node) threads over its processes."""
        return max(1, self.threads("train", model) // self.processes_per_node(model))

    def snakemake_resources(self, step: str, model: str | None = None) -> dict[str, Any]:
        """The `resources:` of a job, in the names the local and SLURM executors read.

        A training job on more than one node also gets nodes, tasks_per_node (one task per GPU,
        each with threads / gpus cores, so the allocation holds every core of every node) and
        `mpi`, which makes the SLURM job step run the job's command as is: the command starts
        its own `srun` over the nodes. gpu is then the job's total (sbatch --gpus). Keys that
        are None are left out by Snakemake.
        """
        res = self.resources(step, model)
        out: dict[str, Any] = {
            "mem_mb": res["mem_mb"],
            "runtime": res["runtime"],
            "gpu": res.get("gpus", 0),
            "nodes": None,
            "tasks_per_node": None,
            "cpus_per_task": None,
            "mpi": None,
        }
        if step == "train" and model is not None and self.nodes(model) > 1:
            # verl: one Ray node per host, which drives all of its GPUs
            per_node = 1 if self.uses_verl(model) else self.processes_per_node(model)
            out.update(
                gpu=self.nodes(model) * self.processes_per_node(model),
                nodes=self.nodes(model),
                tasks_per_node=per_node,
                cpus_per_task=max(1, self.threads("train", model) // per_node),
                mpi="srun",
            )
        return out

    def env_file(self, model: str | None = None) -> str:
        """Conda env of a job, relative to workflows/ (Snakemake resolves it from the rule file)."""
        env = self.cfg["models"][model]["env"] if model else "cpu"
        return f"../envs/{env}.yaml"

    # --- commands -----------------------------------------------------------------------------
    def command(self, name: str) -> str:
        cmd = self.cfg["commands"][name]
        return f"{cmd['launcher']} {cmd['module']}"

    def uses_verl(self, model: str) -> bool:
        return model_training(self.cfg, model)["backend"] == "verl"

    def train_command(self, model: str | None = None) -> str:
        """The trainer invocation (without --config); run.yaml's `imports` names the modules of
        rules registered outside this package, which the train command imports itself.

        With a model and an `accelerate launch` launcher, the launch gets --num_processes (all
        nodes' GPUs). On more than one node the command is one srun task per node, each running
        `accelerate launch` with its node's rank and the first node as the rendezvous host;
        the trainer's own arguments (--config, appended by train-job) reach it through "$@".
        """
        if model is not None and self.uses_verl(model):
            # verl starts its own workers (Ray); on several nodes the job's first node becomes
            # the Ray head and srun starts a worker on every other node
            verl_train = self.command("verl_train")
            if self.nodes(model) > 1:
                return f"{VERL_RAY_SLURM} {verl_train}"
            return verl_train
        cmd = self.cfg["commands"]["train"]
        launcher = cmd["launcher"]
        target = cmd["module"]
        if model is None or not is_accelerate_launcher(launcher):
            return f"{launcher} {target}"
        # "accelerate launch --config_file F -m" -> "--config_file F -m"
        rest = [shlex.join(shlex.split(launcher)[2:])]
        nodes = self.nodes(model)
        flags = ["--num_processes", str(self.world_size(model))]
        if nodes == 1:
            return " ".join(["accelerate", "launch", *flags, *rest, target])
        # expanded by each srun task on its own node (inside bash -c), not by the job's shell
        flags += [
            f"--num_machines {nodes}",
            '--machine_rank "$SLURM_NODEID"',
            '--main_process_ip "$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
            f'--main_process_port "$(({MAIN_PROCESS_PORT_BASE} + SLURM_JOB_ID % 10000))"',
        ]
        per_node = " ".join(["exec accelerate launch", *flags, *rest, target, '"$@"'])
        srun = (
            f"srun --nodes={nodes} --ntasks={nodes} --ntasks-per-node=1"
            f" --cpus-per-task={self.threads('train', model)}"
            f" --gpus-per-node={self.processes_per_node(model)} --kill-on-bad-exit=1"
        )
        return f"{srun} bash -c {shlex.quote(per_node)} cppo-train"

    def toy_args(self, step: str) -> str:
        return format_cli_args(self.cfg["toy"][step]["args"])

    def eval_args(self, model: str) -> str:
        """Options of `python -m evaluation` after --model, shared by every checkpoint."""
        ev = self.cfg["evaluation"]
        files = " ".join(
            f"--benchmark-file {shlex.quote(self.matrix.benchmark_path(b))}"
            for b in ev["benchmarks"]
        )
        backend = ev["backend"]
        horizon = model_schedule(self.cfg, model)["max_completion_length"]
        opts: dict[str, Any] = {
            "k": ev["k"],
            "temperature": ev["temperature"],
            "top-p": ev["top_p"],
            "max-new-tokens": ev["max_new_tokens"] or horizon,
            "backend": backend,
            "seed": ev["seed"],
            "grading-mode": ev["grading_mode"],
        }
        if backend == "vllm":
            opts["tensor-parallel-size"] = max(1, self.resources("evaluate", model).get("gpus", 1))
        else:
            opts["batch-size"] = ev["batch_size"]
            opts["sampler"] = ev["sampler"]
        extra = format_cli_args({**opts, **ev["args"]})
        return f"{files} {extra}"

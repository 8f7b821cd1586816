"""Submit scale/train.py to a SLURM cluster with submitit: one task per GPU, requeued when preempted or out of time.

    python scale/launch_slurm.py --nodes 4 --gpus-per-node 8 --partition learn --time 72:00:00 -- \\
        --config vitg14-lvd142m --data folder:/datasets/imagenet/train --output-dir /checkpoint/$USER/g14

Everything after `--` is passed to scale/train.py unchanged. SLURM starts nodes x gpus-per-node tasks; each task
learns its rank from submitit's JobEnvironment and joins one NCCL process group (the environment torchrun would
set: MASTER_ADDR = first node, MASTER_PORT from the job id, RANK, LOCAL_RANK, WORLD_SIZE). When SLURM preempts
the job or its time limit nears, the run finishes its step, writes a checkpoint and stops; then submitit calls
Trainer.checkpoint, which requeues the same command: the new job resumes from the newest checkpoint in
--output-dir (scale/train.py always does). --dry-run prints the job and the environment of every task without submitting.
"""
import argparse
import os
import re
import signal
import sys

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_time(text: str) -> int:
    """SLURM-style time limit -> minutes: "90" (minutes), "4:00:00", "2-00:00:00" (days-hours:minutes:seconds)."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not match:
        raise ValueError(f"--time {text!r} is not a SLURM time limit: use minutes (90), H:MM:SS (72:00:00) "
                         "or D-HH:MM:SS (2-00:00:00)")
    days, first, second, third = match.groups()
    if second is None:  # minutes only
        minutes = int(first)
    elif third is None:  # H:MM
        minutes = int(first) * 60 + int(second)
    else:  # H:MM:SS (seconds rounded up)
        minutes = int(first) * 60 + int(second) + (int(third) > 0)
    minutes += int(days or 0) * 24 * 60
    if minutes <= 0:
        raise ValueError(f"--time {text!r} must be positive")
    return minutes


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the epilog's line breaks and shows every option's default."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python scale/launch_slurm.py", description=__doc__.splitlines()[0],
                                     formatter_class=_HelpFormatter,
                                     epilog="then: -- TRAIN_ARGS (those of scale/train.py; --output-dir is required)")
    parser.add_argument("--nodes", type=int, default=1, help="SLURM nodes")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs (= tasks) per node")
    parser.add_argument("--partition", default=None, help="SLURM partition (default: the cluster's)")
    parser.add_argument("--time", default="72:00:00", help="time limit per job: minutes, H:MM:SS or D-HH:MM:SS")
    parser.add_argument("--cpus-per-task", type=int, default=10, help="CPU cores per GPU (data loading)")
    parser.add_argument("--mem-gb", type=int, default=0, help="memory per node in GB (0: the partition's default)")
    parser.add_argument("--name", default="dinolite-scale", help="SLURM job name")
    parser.add_argument("--logs", default=None, help="submitit's logs (default: OUTPUT_DIR/slurm)")
    parser.add_argument("--max-requeues", type=int, default=20, help="give up after this many preemptions/time-outs")
    parser.add_argument("--account", default=None, help="SLURM account to charge (sbatch --account)")
    parser.add_argument("--qos", default=None, help="SLURM quality of service (sbatch --qos)")
    parser.add_argument("--constraint", default=None, help="node features, e.g. 'h100|a100' (sbatch --constraint)")
    parser.add_argument("--exclusive", action="store_true", help="whole nodes for this job (sbatch --exclusive)")
    parser.add_argument("--setup", action="append", default=[], metavar="COMMAND",
                        help="a shell command run before the training on each node, e.g. 'module load cuda/12.4' "
                             "or 'source ~/venv/bin/activate' (repeat for several, run in order)")
    parser.add_argument("--dry-run", action="store_true", help="print the job and each task's environment; submit nothing")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the arguments of scale/train.py")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and check; ValueError with a one-line message on bad input."""
    args = build_parser().parse_args(argv)
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    if args.nodes < 1 or args.gpus_per_node < 1:
        raise ValueError(f"--nodes and --gpus-per-node must be >= 1, got {args.nodes} and {args.gpus_per_node}")
    if "--output-dir" not in train_args:
        raise ValueError("the training arguments need --output-dir (on a file system every node sees): a requeued job "
                         "resumes from its newest checkpoint. Usage: launch_slurm.py [options] -- --config C --data D "
                         "--output-dir DIR [key=value ...]")
    from scale.train import build_parser as train_parser
    train_parser().parse_args(train_args)  # fails early (exit 2) on arguments scale/train.py would reject
    args.train_args = train_args
    args.output_dir = train_args[train_args.index("--output-dir") + 1]
    args.timeout_min = parse_time(args.time)
    return args


def executor_parameters(args: argparse.Namespace) -> dict:
    """submitit AutoExecutor.update_parameters(...) for one task per GPU."""
    params = dict(name=args.name, nodes=args.nodes, tasks_per_node=args.gpus_per_node,
                  gpus_per_node=args.gpus_per_node, cpus_per_task=args.cpus_per_task, timeout_min=args.timeout_min,
                  slurm_signal_delay_s=120)  # the requeue signal comes 2 min before the time limit
    if args.partition:
        params["slurm_partition"] = args.partition
    if args.mem_gb:
        params["mem_gb"] = args.mem_gb
    for name in ("account", "qos", "constraint"):
        if getattr(args, name):
            params[f"slurm_{name}"] = getattr(args, name)
    if args.exclusive:
        params["slurm_exclusive"] = True
    if args.setup:
        params["slurm_setup"] = list(args.setup)
    return params


def distributed_env(global_rank: int, local_rank: int, num_tasks: int, num_nodes: int, first_host: str,
                    job_id: str) -> dict:
    """The environment variables torchrun would set for one task (what scale/train.py's init_distributed reads)."""
    digits = re.sub(r"\D", "", str(job_id)) or "0"
    return {
        "MASTER_ADDR": first_host,
        "MASTER_PORT": str(20000 + int(digits[-6:]) % 20000),  # the same on every task of the job, varies by job
        "RANK": str(global_rank),
        "LOCAL_RANK": str(local_rank),
        "WORLD_SIZE": str(num_tasks),
        "LOCAL_WORLD_SIZE": str(num_tasks // num_nodes),
    }


class Trainer:
    """The submitted callable: runs scale/train.py's main in this task; requeues itself on preemption/time-out."""

    def __init__(self, train_args: list[str]):
        self.train_args = list(train_args)

    def __call__(self) -> int:
        import submitit

        from dinolite.train.faults import PREEMPTED_EXIT_CODE

        job = submitit.JobEnvironment()
        os.environ.update(distributed_env(job.global_rank, job.local_rank, job.num_tasks, job.num_nodes,
                                          job.hostnames[0], job.job_id))
        from scale.train import main
        # submitit's time-limit signal (SLURM sends it --signal-delay-s before the limit) would requeue the job
        # in the middle of a step, losing the steps since the last checkpoint; the run catches it as it does
        # SIGTERM (finish the step, checkpoint, return PREEMPTED_EXIT_CODE) and hands it back to submitit after.
        requeue_signal = getattr(signal, "SIG" + getattr(job, "USR_SIG", "USR2"))  # SUBMITIT_PREEMPT_SIGNAL
        code = main(self.train_args, stop_signals=(signal.SIGTERM, requeue_signal))
        if code == PREEMPTED_EXIT_CODE and signal.getsignal(requeue_signal) not in (signal.SIG_DFL, signal.SIG_IGN,
                                                                                      None):
            signal.raise_signal(requeue_signal)  # submitit's handler: rank 0 requeues the job (checkpoint()), exits
        if code:
            raise SystemExit(code)
        return code

    def checkpoint(self, *args, **kwargs):
        """Called by submitit before the job is stopped: submit the same command again (it resumes)."""
        import submitit

        return submitit.helpers.DelayedSubmission(Trainer(self.train_args))


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    params = executor_parameters(args)
    logs = args.logs or os.path.join(args.output_dir, "slurm")
    if args.dry_run:
        print(f"job: {params}, logs in {logs}, up to {args.max_requeues} requeues")
        tasks = args.nodes * args.gpus_per_node
        for rank in range(tasks):
            env = distributed_env(rank, rank % args.gpus_per_node, tasks, args.nodes, "<first node>", "<job id>")
            print(" ".join(f"{k}={v}" for k, v in env.items()) + " python scale/train.py " + " ".join(args.train_args))
        return 0
    try:
        import submitit
    except ImportError:
        print("error: submitit is not installed: pip install -e '.[scale]' (or pip install submitit)", file=sys.stderr)
        return 2
    executor = submitit.AutoExecutor(folder=logs, slurm_max_num_timeout=args.max_requeues)
    executor.update_parameters(**params)
    job = executor.submit(Trainer(args.train_args))
    print(f"submitted job {job.job_id}: {args.nodes} node(s) x {args.gpus_per_node} GPU(s), logs in {logs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

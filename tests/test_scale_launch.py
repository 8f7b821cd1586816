"""scale/launch_slurm.py without SLURM: arguments, the job it asks for, each task's torchrun-like environment,
requeueing, and a real 2-task run through submitit's LocalExecutor (which also resumes a preempted run)."""
import json
import os
import signal

import pytest

from scale import launch_slurm
from scale.launch_slurm import Trainer, distributed_env, executor_parameters, parse_args, parse_time

TRAIN = ["--config", "tiny-cpu", "--data", "textures:n=64", "--output-dir"]
TINY = ["train.epochs=1", "train.epoch_length=2", "train.batch_size=4", "train.num_workers=0", "train.progress=false",
        "dist.param_dtype=fp32", "model.depth=1", "train.log_every=1"]


def test_time_limits_in_slurm_formats():
    assert parse_time("90") == 90 and parse_time("4:00:00") == 240 and parse_time("72:00:00") == 72 * 60
    assert parse_time("2-00:00:00") == 2 * 24 * 60 and parse_time("1:30") == 90 and parse_time("0:00:30") == 1
    for bad in ("", "3h", "0", "1:xx"):
        with pytest.raises(ValueError, match="--time"):
            parse_time(bad)


def test_job_parameters_one_task_per_gpu():
    args = parse_args(["--nodes", "4", "--gpus-per-node", "8", "--partition", "learn", "--time", "72:00:00", "--",
                       *TRAIN, "runs/g14", "train.batch_size=12"])
    assert args.train_args == [*TRAIN, "runs/g14", "train.batch_size=12"] and args.output_dir == "runs/g14"
    params = executor_parameters(args)
    assert params["nodes"] == 4 and params["tasks_per_node"] == params["gpus_per_node"] == 8
    assert params["timeout_min"] == 4320 and params["slurm_partition"] == "learn"


def test_bad_arguments_are_one_line_errors(capsys):
    assert launch_slurm.main(["--nodes", "2", "--", "--config", "tiny-cpu", "--data", "textures"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the training arguments need --output-dir") and "\n" not in err
    assert launch_slurm.main(["--time", "3h", "--", *TRAIN, "x"]) == 2
    assert capsys.readouterr().err.startswith("error: --time '3h'")


def test_each_task_gets_the_environment_torchrun_would_set(capsys):
    envs = [distributed_env(rank, rank % 8, 16, 2, "node-a", "4242") for rank in range(16)]
    assert [e["RANK"] for e in envs] == [str(r) for r in range(16)]
    assert [e["LOCAL_RANK"] for e in envs] == [str(r % 8) for r in range(16)]
    assert {e["MASTER_ADDR"] for e in envs} == {"node-a"} and {e["MASTER_PORT"] for e in envs} == {"24242"}
    assert {(e["WORLD_SIZE"], e["LOCAL_WORLD_SIZE"]) for e in envs} == {("16", "8")}
    assert distributed_env(0, 0, 1, 1, "h", "123_4")["MASTER_PORT"] == str(20000 + 1234)  # array job ids
    assert launch_slurm.main(["--nodes", "2", "--gpus-per-node", "2", "--dry-run", "--", *TRAIN, "runs/x"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 + 4 and "RANK=3 LOCAL_RANK=1 WORLD_SIZE=4" in lines[-1]


def test_requeue_submits_the_same_command():
    pytest.importorskip("submitit")
    trainer = Trainer([*TRAIN, "runs/x"])
    requeued = trainer.checkpoint()
    assert isinstance(requeued.function, Trainer) and requeued.function is not trainer
    assert requeued.function.train_args == trainer.train_args


def test_local_executor_runs_two_tasks_and_a_requeued_job_resumes(tmp_path):
    submitit = pytest.importorskip("submitit")
    executor = submitit.LocalExecutor(folder=str(tmp_path / "logs"))
    executor.update_parameters(tasks_per_node=2, nodes=1, timeout_min=5)
    run_dir = str(tmp_path / "run")
    args = [*TRAIN, run_dir, *TINY]
    # "Preempted" after step 1 (its checkpoint is written), then the job submitit would requeue.
    assert executor.submit(Trainer([*args, "--stop-at-step", "1"])).results() == [0, 0]
    assert executor.submit(Trainer(args).checkpoint().function).results() == [0, 0]
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        assert [r["step"] for r in map(json.loads, f) if "loss" in r] == [1, 2]
    assert sorted(os.listdir(run_dir)) == ["config.yaml", "data.txt", "dcp_00000001", "dcp_00000002", "metrics.jsonl",
                                           "teacher_backbone_official.pth"]
    logs = "".join(open(p).read() for p in (tmp_path / "logs").glob("*_0_log.out"))
    assert "resuming from step 1" in logs and "done: 2/2 steps on 2 processes" in logs


def test_a_run_stopped_by_the_time_limit_signal_hands_it_back_to_submitit(monkeypatch):
    # The run catches submitit's requeue signal like SIGTERM (finish the step, checkpoint, exit 143), then
    # raises it again for submitit's own handler, which requeues the job on rank 0.
    submitit = pytest.importorskip("submitit")
    import scale.train

    class Job:
        global_rank, local_rank, num_tasks, num_nodes, hostnames, job_id, USR_SIG = 0, 0, 1, 1, ["node0"], "42", "USR2"

    got = {}

    def fake_main(argv, stop_signals):
        got["stop_signals"] = stop_signals
        return got["code"]

    monkeypatch.setattr(submitit, "JobEnvironment", Job)
    monkeypatch.setattr(scale.train, "main", fake_main)
    for var in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.setenv(var, "")  # restored after the test: Trainer sets them
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: got.setdefault("requeued", signum))  # submitit's
    try:
        got["code"] = 143
        with pytest.raises(SystemExit) as stopped:
            Trainer(TRAIN)()
        assert stopped.value.code == 143 and got["requeued"] == signal.SIGUSR2
        assert set(got["stop_signals"]) == {signal.SIGTERM, signal.SIGUSR2}
        del got["requeued"]
        got["code"] = 0
        assert Trainer(TRAIN)() == 0 and "requeued" not in got  # a finished run is not requeued
    finally:
        signal.signal(signal.SIGUSR2, previous)

"""Run a test function in N CPU processes joined by a gloo process group."""
import datetime
import os
import socket
import tempfile

import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, result_dir, timeout_s=None):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    timeout = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
    dist.init_process_group("gloo", rank=rank, world_size=world_size, **timeout)
    try:
        result = fn(rank, world_size, *args)
        import torch

        torch.save(result, os.path.join(result_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world_size=2, args=(), timeout_s=None):
    """Call `fn(rank, world_size, *args)` in `world_size` processes; return the list of results.
    timeout_s: the group's collective timeout (a test of a possible hang fails instead of waiting 30 minutes).

    `fn` must be a module-level function (it is pickled). Results are saved with torch.save,
    so they may be tensors or plain Python containers of tensors.
    """
    import torch

    with tempfile.TemporaryDirectory() as result_dir:
        mp.start_processes(_worker, args=(world_size, _free_port(), fn, args, result_dir, timeout_s),
                           nprocs=world_size, join=True, start_method="spawn")
        return [torch.load(os.path.join(result_dir, f"{r}.pt"), weights_only=False)
                for r in range(world_size)]

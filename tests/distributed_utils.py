"""Run a test function in N CPU processes joined by a gloo process group."""
import os
import socket
import tempfile

import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, result_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        import torch

        torch.save(result, os.path.join(result_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world_size=2, args=()):
    """Call `fn(rank, world_size, *args)` in `world_size` processes; return the list of results.

    `fn` must be a module-level function (it is pickled). Results are saved with torch.save,
    so they may be tensors or plain Python containers of tensors.
    """
    import torch

    with tempfile.TemporaryDirectory() as result_dir:
        mp.start_processes(_worker, args=(world_size, _free_port(), fn, args, result_dir),
                           nprocs=world_size, join=True, start_method="spawn")
        return [torch.load(os.path.join(result_dir, f"{r}.pt"), weights_only=False)
                for r in range(world_size)]

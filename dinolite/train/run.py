"""The run engine shared by every training loop (dinolite.train.loop, dinolite.train.distill, scale/train.py).

A loop is an explicit for-loop over these pieces; what differs between loops (the model, the step, what a
checkpoint holds, what is exported) stays in the loop's own file:

    run_dir = RunDir(output_dir)                # checks the directory, removes the temp files of killed saves
    path = run_dir.latest_checkpoint()          # resume: run_dir.check_config(cfg), load, start_step = its step
    run_dir.start(start_step, save_config_to(cfg))   # config.yaml; metrics.jsonl cut back to start_step
    log, cadence = MetricsLog(run_dir), Cadence(cfg.train, end_step)
    steps = Steps(make_loader(batches, num_workers, device), start_step, end_step, progress)
    for step, batch in steps:
        out = train_step(...)                   # losses, backward, clip, optimiser step, EMA: in the loop's file
        if cadence.log(step + 1): log.log({...})
        if cadence.checkpoint(step + 1): save_checkpoint(...)
    # steps.completed; the final kNN and the export
"""
import contextlib
import copy
import dataclasses
import functools
import json
import math
import os
import shutil
import signal
import time
import warnings

import torch

from dinolite.checkpoint import latest_checkpoint, remove_stale_temp_files
from dinolite.data import DataError, EvalTransform, ImageFolderDataset, SyntheticShapes, SyntheticTextures, build_dataset
from dinolite.data.index import indexable, indexed_dataset
from dinolite.data.spec import write_data_spec
from dinolite.train.config import Config, TrainConfig, config_diff, load_config, save_config
from dinolite.train.data import decode_side
from dinolite.train.precision import resolve_precision

# Run-control keys that may change when resuming: they do not change what is computed.
RESUMABLE_KEYS = {
    "train.device", "train.num_workers", "train.threads", "train.progress", "train.tensorboard",
    "train.log_every", "train.checkpoint_every", "train.keep_last", "train.monitor_every", "train.knn_every",
    "train.max_nonfinite", "train.max_bad_images_fraction",
    "train.verify_images", "train.wandb", "train.knn_data",
}
TORCHVISION_KINDS = ("cifar10", "stl10", "imagenette")  # --data kinds with their own test split


class OutputDirError(ValueError):
    """The output directory cannot be used for this run (a different config is saved there, or it is a file)."""


# ---------------------------------------------------------------------------------------
# devices, threads, precision


class UnusableGPUError(RuntimeError):
    """A GPU is present but torch cannot use it (driver older than torch's CUDA build, a broken install)."""


def gpu_present() -> bool:
    """An NVIDIA GPU is on this machine, whether or not torch can use it (the driver's device files)."""
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0")


def resolve_device(name: str) -> torch.device:
    """train.device -> torch.device. "auto" is CUDA when torch can use a GPU and the CPU when there is none;
    a GPU that is present but unusable (torch.cuda.is_available() False, e.g. a driver older than this torch's
    CUDA build) is a loud one-line error rather than a silent CPU run."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if gpu_present():
            raise UnusableGPUError(f"a GPU is present but torch {torch.__version__} (CUDA {torch.version.cuda}) cannot "
                                   "use it (torch.cuda.is_available() is False: driver older than the CUDA build?); "
                                   "update the NVIDIA driver or install a matching torch, or set train.device=cpu")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UnusableGPUError(f"train.device={name} but torch cannot use a GPU here (torch.cuda.is_available() is "
                               "False); set train.device=cpu or auto, or fix the NVIDIA driver")
    return device


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one, e.g. under taskset)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def intra_op_threads(threads: int, num_workers: int) -> int:
    """Threads for the training process's own ops: `threads`, or for 0 (auto) the cores the data workers leave.

    Each DataLoader worker is a process that keeps one core busy decoding and augmenting. With
    more compute threads than free cores, the threads of one op wait on each other while the
    workers hold their cores, and a step can take several times longer. Auto never exceeds
    torch's current setting, so OMP_NUM_THREADS or an earlier torch.set_num_threads still caps it.
    """
    if threads > 0:
        return threads
    return max(1, min(torch.get_num_threads(), available_cores() - num_workers))


def one_thread_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: one compute thread per worker (the training process sizes its own).

    PyTorch's worker loop sets one thread as well; saying it here keeps the whole thread budget in one file.
    Workers ignore SIGTERM: SLURM sends it to every process of the job, and the training process needs its
    workers to finish the current step and write a checkpoint (see Preemption); they exit with it.
    """
    torch.set_num_threads(1)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_autocast(device: torch.device, precision: str):
    """A no-argument context factory: bf16 autocast on CPU or CUDA, or nothing for fp32 ("auto": see
    dinolite.train.precision.resolve_precision)."""
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext
    return functools.partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16)


# ---------------------------------------------------------------------------------------
# data


def run_length(cfg: Config, dataset, world_size: int = 1) -> tuple[int, int]:
    """(epoch_length, total_steps): train.epoch_length or one pass over the dataset in global batches."""
    t = cfg.train
    epoch_length = t.epoch_length or max(1, len(dataset) // (t.batch_size * world_size))
    return epoch_length, t.epochs * epoch_length


def shared_memory_need(cfg: Config, num_workers: int, prefetch_factor: int = 2) -> int:
    """Bytes of /dev/shm the data workers hold at once: prefetch_factor float32 batches per worker (2 global + n_local
    local crops per image; ViT-S/16 at 224/96 px, batch 64: 134 MB a batch, 2.1 GB (2040 MiB) for 8 workers)."""
    c, b = cfg.crops, cfg.train.batch_size
    per_image = 3 * 4 * (2 * c.global_size ** 2 + c.n_local * c.local_size ** 2)
    return num_workers * prefetch_factor * b * per_image


def warn_if_shared_memory_short(cfg: Config, num_workers: int, path: str = "/dev/shm") -> None:
    """Data workers hand batches over in shared memory; a container's default /dev/shm (64 MB) ends in a 'Bus
    error'. Warn (once, before the first step) when /dev/shm is smaller than the workers need."""
    if num_workers == 0 or not os.path.isdir(path):
        return
    need, have = shared_memory_need(cfg, num_workers), shutil.disk_usage(path).total
    if have < need:
        warnings.warn(f"{path} holds {have / 2**20:.0f} MB but {num_workers} data workers need about "
                      f"{need / 2**20:.0f} MB: give the container more (docker --shm-size={-(-need // 2**30) + 1}g or "
                      "--ipc=host) or lower train.num_workers / train.batch_size")


def make_loader(batches, num_workers: int, device: torch.device) -> torch.utils.data.DataLoader:
    """The DataLoader over StepBatches (one item = one collated step), with one compute thread per worker, pinned
    memory on CUDA (asynchronous copies), and a warning when /dev/shm is too small for the workers."""
    if hasattr(batches, "cfg"):
        warn_if_shared_memory_short(batches.cfg, num_workers)
    return torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False, num_workers=num_workers,
                                       pin_memory=device.type == "cuda", worker_init_fn=one_thread_worker)


def knn_datasets(data, cfg: Config):
    """(train, held-out) datasets of (image tensor, label) for kNN, or None when there are no labels.

    Images are resized and centre-cropped to crops.global_size. Built-in SyntheticShapes and
    SyntheticTextures: the held-out split is the same generator with another seed (new images,
    same classes); torchvision datasets: their test split.
    """
    size = cfg.crops.global_size
    transform = EvalTransform(resize_size=size, crop_size=size)
    t = cfg.train
    if isinstance(data, (SyntheticShapes, SyntheticTextures)):
        n_train = t.knn_train_size or len(data)
        n_test = t.knn_test_size or max(1, len(data) // 5)
        no_masks = {"return_mask": False} if isinstance(data, SyntheticShapes) else {}
        train_set = data.replace(num_images=min(n_train, len(data)), transform=transform, **no_masks)
        test_set = data.replace(num_images=n_test, seed=data.seed + 1_000_003, transform=transform, **no_masks)
        return train_set, test_set
    if isinstance(data, str) and data.split(":")[0] in TORCHVISION_KINDS:
        train_set = build_dataset(data, transform=transform, train=True)
        test_set = build_dataset(data, transform=transform, train=False)
        if t.knn_train_size:
            train_set = torch.utils.data.Subset(train_set, range(min(t.knn_train_size, len(train_set))))
        if t.knn_test_size:
            test_set = torch.utils.data.Subset(test_set, range(min(t.knn_test_size, len(test_set))))
        return train_set, test_set
    if t.knn_data or isinstance(data, ImageFolderDataset):
        return folder_knn_datasets(data, cfg, transform)
    return None


def labels_of(dataset) -> list[int] | None:
    """The labels of an ImageFolderDataset / ImageListDataset without decoding an image (None: other kinds)."""
    samples = getattr(dataset, "samples", None)
    return [label for _, label in samples] if isinstance(dataset, ImageFolderDataset) and samples else None


def held_out_split(dataset, labels: list[int], cfg: Config, transform):
    """(memory, queries) of a labelled folder: a seeded random train.knn_test_size images (default a fifth, at most
    half) as queries, the others (the first train.knn_train_size of them) as the kNN's memory. The queries stay in
    the self-supervised training set: training never reads labels; the split keeps kNN's memory and queries apart."""
    t = cfg.train
    view = copy.copy(dataset)
    view.transform = transform
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(t.seed + 1_000_003)).tolist()
    n_test = min(t.knn_test_size or max(1, len(labels) // 5), len(labels) // 2)
    memory = order[n_test:][: t.knn_train_size or None]
    return torch.utils.data.Subset(view, memory), torch.utils.data.Subset(view, order[:n_test])


def folder_knn_datasets(dataset, cfg: Config, transform):
    """kNN data of image folders / lists: train.knn_data (a labelled spec: the queries, with the training folder as
    the memory when it has the same classes, else split itself), or a held-out split of a labelled training folder.
    None when there are no labels."""
    t = cfg.train
    labels = labels_of(dataset)
    labelled = labels is not None and min(labels) >= 0 and len(set(labels)) >= 2
    if not t.knn_data:
        return held_out_split(dataset, labels, cfg, transform) if labelled else None
    kind = t.knn_data.split(":")[0]
    if kind in TORCHVISION_KINDS or kind in ("builtin", "textures"):  # its own held-out split, as for --data
        own = dataclasses.replace(cfg, train=dataclasses.replace(t, knn_data=""))
        return knn_datasets(t.knn_data if kind in TORCHVISION_KINDS else build_dataset(t.knn_data), own)
    extra = build_dataset(t.knn_data, transform=transform, train=False)
    extra_labels = labels_of(extra) or []
    if extra_labels and min(extra_labels) < 0:
        raise DataError(f"train.knn_data={t.knn_data} has unlabelled images: give a folder with one subfolder "
                        "per class (or a list: file with PATH<TAB>LABEL lines)")
    if not labelled:  # an unlabelled training folder: the kNN folder is its own memory and queries
        return held_out_split(extra, extra_labels, cfg, transform)
    if getattr(dataset, "classes", None) != getattr(extra, "classes", None):
        raise DataError(f"train.knn_data={t.knn_data} has classes {getattr(extra, 'classes', None)} but the "
                        f"training data has {getattr(dataset, 'classes', None)}: use the same class subfolder names")
    view = copy.copy(dataset)
    view.transform = transform
    memory = torch.utils.data.Subset(view, range(min(t.knn_train_size or len(view), len(view))))
    queries = torch.utils.data.Subset(extra, range(min(t.knn_test_size or len(extra), len(extra))))
    return memory, queries


def training_data(data, cfg: Config, knn_data="auto", log=print, index_dir: str | None = None):
    """(dataset, knn_data) of a run: data is a --data spec or a dataset; knn_data "auto" -> knn_datasets
    (logs one line when the data has no labels for kNN). folder:/list: specs are indexed once, on rank 0, into
    index_dir/file_index.json (the run directory), and read from there on resume (dinolite.data.index)."""
    if indexable(data):
        dataset = indexed_dataset(data, index_dir, cfg.train.verify_images, log)
    else:
        dataset = build_dataset(data) if isinstance(data, str) else data
    if isinstance(dataset, ImageFolderDataset):
        dataset.draft_side = decode_side(cfg)  # JPEGs decoded at the smallest size the crops need
    if hasattr(dataset, "max_bad_images"):  # files that go bad mid-run: skipped up to this many, then an error
        dataset.max_bad_images = max(1, int(cfg.train.max_bad_images_fraction * len(dataset)))
    if knn_data == "auto":
        has_test_split = isinstance(data, str) and data.split(":")[0] in TORCHVISION_KINDS
        knn_data = knn_datasets(data if has_test_split else dataset, cfg)
        if knn_data is None:
            log(f"note: no kNN accuracy for this run: {data if isinstance(data, str) else 'the data'} has no labels "
                "(no class subfolders); set train.knn_data=folder:VAL (one subfolder per class) to follow it")
    return dataset, knn_data


# ---------------------------------------------------------------------------------------
# the output directory


class RunDir:
    """A run's output directory: checkpoints, config.yaml, metrics.jsonl. path None: nothing is written or resumed.

    Creating it checks the path (a directory, created if missing) and, on the main process, removes the
    temporary files of checkpoint saves that a killed process left (`remove_stale`: dinolite.checkpoint's for
    checkpoint_<step>.pth files, scale.checkpoint's for DCP directories).
    """

    def __init__(self, path: str | None, is_main: bool = True, log=print, latest=latest_checkpoint,
                 remove_stale=remove_stale_temp_files):
        self.path, self.is_main, self._latest = path, is_main, latest
        if not path:
            return
        if os.path.exists(path) and not os.path.isdir(path):
            raise OutputDirError(f"output directory {path} is a file; give the path of a directory "
                                 "(it is created if missing)")
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            raise OutputDirError(f"cannot create output directory {path} ({e.strerror}: {e.filename}); "
                                 "give a path you can write to") from None
        if is_main:
            for stale in remove_stale(path):
                log(f"removed {stale}: the temporary file of a checkpoint save that never finished")

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def latest_checkpoint(self) -> str | None:
        """The newest checkpoint: only a directory with one holds a run to resume. Without one, a run that failed
        early (e.g. batch too large for the data) is retried with the new config."""
        return self._latest(self.path) if self.path else None

    def check_config(self, cfg: Config, load=load_config, allowed=RESUMABLE_KEYS, extra_diff: dict | None = None):
        """The saved config.yaml must equal cfg but for the `allowed` (run-control) keys."""
        saved_path = self.file("config.yaml")
        if not os.path.exists(saved_path):
            return
        saved = load(saved_path)
        saved_cfg = saved[0] if isinstance(saved, tuple) else saved
        diff = {k: v for k, v in config_diff(saved_cfg, cfg).items() if k not in allowed}
        diff.update(extra_diff(saved) if callable(extra_diff) else {})
        if diff:
            lines = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise OutputDirError(f"{self.path} holds a run with a different config ({lines}). Resume with the "
                                 f"same config, or use a new --output-dir. Only these keys may change on resume: "
                                 f"{', '.join(sorted(RESUMABLE_KEYS))}")

    def start(self, resumed_step: int, save=None, data=None) -> None:
        """Main process: write config.yaml (save(path)) and data.txt (the --data spec, when data is one), and cut
        metrics.jsonl back to the step resumed from, so steps a killed run logged after its last checkpoint are
        not logged twice (resumed_step 0: removed)."""
        if not (self.path and self.is_main):
            return
        if save is not None:
            save(self.file("config.yaml"))
        write_data_spec(self.path, data)
        metrics = self.file("metrics.jsonl")
        if not os.path.exists(metrics):
            return
        if resumed_step == 0:
            os.remove(metrics)  # left by a run that never checkpointed
            return
        with open(metrics) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= resumed_step]
        with open(metrics, "w") as f:
            f.writelines(kept)

    def first_logged(self, key: str) -> float | None:
        """The first value of `key` in metrics.jsonl (None if there is none)."""
        path = self.file("metrics.jsonl") if self.path else ""
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return next((record[key] for record in map(json.loads, f) if key in record), None)


def save_config_to(cfg: Config):
    """A `save` for RunDir.start: path -> config.yaml of cfg."""
    return functools.partial(save_config, cfg)


# ---------------------------------------------------------------------------------------
# logging and cadence


class MetricsLog:
    """metrics.jsonl and an in-memory history (every process), plus TensorBoard (RUN/tensorboard) when it is
    installed and train.tensorboard is on, and Weights & Biases when `wandb` names a project (main process)."""

    def __init__(self, run_dir: RunDir, tensorboard: bool = False, wandb: str = ""):
        self.history = []
        self.path = run_dir.file("metrics.jsonl") if (run_dir.path and run_dir.is_main) else None
        self.writer = tensorboard_writer(run_dir.file("tensorboard")) if (tensorboard and self.path) else None
        self.wandb = wandb_run(wandb, run_dir.path) if (wandb and self.path) else None

    def log(self, record: dict):
        self.history.append(record)
        if self.path:
            with open(self.path, "a") as f:
                f.write(strict_json(record) + "\n")
        scalars = {k: v for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)}
        if self.writer:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, record["step"])
        if self.wandb:
            self.wandb.log(scalars, step=record["step"])

    def close(self):
        if self.writer:
            self.writer.close()
        if self.wandb:
            self.wandb.finish()


def tensorboard_writer(log_dir: str):
    """A TensorBoard SummaryWriter, or None when tensorboard is not installed (pip install -e '.[tensorboard]')."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # needs the optional tensorboard package
    except ImportError:
        return None
    return SummaryWriter(log_dir)


def wandb_run(project: str, run_path: str):
    """A Weights & Biases run in `project` named after the run directory, or None (with a warning) without wandb."""
    try:
        import wandb  # optional: pip install -e '.[wandb]'
    except ImportError:
        warnings.warn(f"train.wandb={project} but wandb is not installed; logging to metrics.jsonl only "
                      "(pip install -e '.[wandb]')", stacklevel=4)
        return None
    return wandb.init(project=project, name=os.path.basename(os.path.abspath(run_path)), dir=run_path,
                      resume="allow")


def strict_json(record: dict) -> str:
    """One JSON line, NaN and infinities written as null (json.dumps would write NaN, which is not JSON)."""
    return json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()},
                      allow_nan=False)


class Cadence:
    """When, after `done` completed steps, to log, evaluate kNN and checkpoint (train.*_every; the last step of
    the run segment always logs and checkpoints; its kNN is the final one, after the loop)."""

    def __init__(self, t: TrainConfig, end_step: int, stop=None):
        self.t, self.end_step, self.stop = t, end_step, stop

    def log(self, done: int) -> bool:
        return done % self.t.log_every == 0 or done == self.end_step

    def knn(self, done: int) -> bool:
        return bool(self.t.knn_every) and done % self.t.knn_every == 0 and done != self.end_step

    def monitor(self, done: int) -> bool:
        return bool(self.t.monitor_every) and (done % self.t.monitor_every == 0 or done == self.end_step)

    def checkpoint(self, done: int) -> bool:
        """Also after the step at which a SIGTERM stops the run (Preemption)."""
        return (done % self.t.checkpoint_every == 0 or done == self.end_step
                or (self.stop is not None and self.stop.now(done)))


class Throughput:
    """Images per second between two calls."""

    def __init__(self, images_per_step: int, start_step: int):
        self.images_per_step, self.last, self.tic = images_per_step, start_step, time.perf_counter()

    def __call__(self, done: int) -> float:
        elapsed, self.tic = time.perf_counter() - self.tic, time.perf_counter()
        rate = self.images_per_step * (done - self.last) / elapsed
        self.last = done
        return rate


class Steps:
    """Iterate (step, batch) over the loader for steps [start_step, end_step) with a progress bar (main process).

    After the loop, `completed` is the number of completed steps (end_step once the loop ran). The bar is
    closed when the loop ends, however it ends.
    """

    def __init__(self, loader, start_step: int, end_step: int, progress: bool, desc: str = "training",
                 stop=None):
        self.loader, self.start_step, self.end_step, self.stop = loader, start_step, end_step, stop
        self.completed = start_step
        self.bar = None
        if progress:
            from tqdm import tqdm  # a text bar: tqdm.auto draws a widget, an empty box in the built book
            self.bar = tqdm(total=end_step, initial=start_step, desc=desc, dynamic_ncols=True)

    def __iter__(self):
        if self.stop is not None:
            self.stop.install()
        batches = iter(self.loader) if self.start_step < self.end_step else None
        try:
            if batches is not None:
                for batch in batches:
                    step = batch["step"]
                    yield step, batch
                    if self.bar:
                        self.bar.update(1)
                    if self.stop is not None and self.stop.now(step + 1):
                        self.completed = step + 1  # the loop body has written the checkpoint (Cadence.checkpoint)
                        return
                    if step + 1 >= self.end_step:
                        break
                self.completed = self.end_step
        finally:
            if self.bar:
                self.bar.close()
            if self.stop is not None:
                self.stop.uninstall()
            # Stop the workers now, also when an error leaves the loop: its traceback would keep the iterator alive
            # until exit, where multiprocessing SIGTERMs the workers, which ignore it (one_thread_worker).
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def show(self, **values: float) -> None:
        if self.bar:
            self.bar.set_postfix({k: f"{v:.3f}" if k != "img_s" else f"{v:.0f}" for k, v in values.items()})

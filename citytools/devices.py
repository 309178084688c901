"""Where and how the model runs: the device, the dtype (auto: float32 on a CPU, fp16 on CUDA), the
split of CPU cores between decoding workers and the model, batch sizes, and host <-> GPU copies that
do not wait. Every choice made from the machine can be forced, so tests run each branch anywhere."""

import contextlib
import os

import torch


def pick_device(device="auto"):
    """A torch.device for --device; a ValueError naming the problem when it does not exist here."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {device}: not a device (use auto, cpu, cuda or cuda:N)") from None
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine (use cpu or auto)")
        if chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif chosen.type != "cpu":
        raise ValueError(f"--device {device}: only cpu and cuda are supported")
    return chosen


def pick_dtype(dtype, device):
    """auto: float16 on CUDA, float32 on a CPU. Whatever the dtype, the model keeps its stem and head
    in float32 and takes float32 pixels (see CityClassifierForImageClassification), so bf16 and fp16
    change scores by less than 1e-2 (tests/test_precision.py); on a CPU bf16 speeds up only the CLIP
    tower, which for the shipped model is a small share of the work (docs: README, "Precision")."""
    if dtype != "auto":
        return getattr(torch, dtype)
    return torch.float16 if device.type == "cuda" else torch.float32


def cpu_has_bf16(cpuinfo="/proc/cpuinfo"):
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX). CITYCLASSIFIER_CPU_BF16=1 or 0
    forces the answer, so that both branches of every choice made on it run on any machine."""
    forced = os.environ.get("CITYCLASSIFIER_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    try:
        with open(cpuinfo) as f:
            flags = f.read().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_workers(device, cores=None):
    """Decoding processes: feeding a GPU, every core but the one that drives it (the data path must
    keep up with the GPU); on a CPU half the cores, the model's threads get the other half (see
    `model_threads`): with the shipped model an image costs about as much to decode and cut as to
    score (bench/bench_classify.py --profile). `cores` defaults to this machine's."""
    cores = cores or os.cpu_count() or 1
    return max(1, cores - 1) if device.type == "cuda" else cores // 2


def model_threads(num_parameters, workers, cores=None):
    """CPU threads for the model beside `workers` decoding processes: the cores they leave free, at
    least 1 (oversubscribed cores cost more than they give); big models are compute-bound and want
    every core. `cores` defaults to this machine's."""
    cores = cores or os.cpu_count() or 1
    return cores if num_parameters > 50_000_000 else max(1, cores - workers)


def default_batch_size(device, model):
    """Images per batch: 8 on a CPU; on a GPU as many as fit, by an estimate of one view's inference
    activations, in half the free memory (5 views an image), between 8 and 64."""
    if device.type != "cuda":
        return 8
    vision = model.config.vision_config
    tokens = (vision.image_size // vision.patch_size) ** 2 + 1
    view_bytes = 2 * tokens * (vision.intermediate_size + 4 * vision.hidden_size) * 2  # fp16, two live layers
    if model.stem is not None:
        side = model.config.pixel_size
        view_bytes += 2 * model.config.stem["channels"][0] * side * side * 2
    free, _ = torch.cuda.mem_get_info(device)
    return int(min(64, max(8, free // 2 // (5 * view_bytes))))


def to_host(tensor):
    """`tensor` in host memory; from a GPU into pinned memory without waiting (read it after
    `ready_event`'s event, or torch.cuda.synchronize). The other way: `to_device`."""
    if tensor.device.type != "cuda":
        return tensor
    return torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True).copy_(tensor, non_blocking=True)


def ready_event(device):
    """A CUDA event recorded behind everything queued so far on `device` (its `synchronize()` waits
    for that work, `to_host` copies included), or None on a CPU, where nothing is left to wait for."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


@contextlib.contextmanager
def cpu_threads(count):
    """torch's CPU threads set to `count` (None: left as they are) for a block, then restored."""
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class InFlight:
    """At most one batch queued on the device ahead of the one the host finishes. `swap(started)`
    keeps `started` (anything with `done()`, which does not wait, and a call, which waits for it) and
    returns the batch before it, taken off first so that it is never finished twice, for the caller
    to finish now; `take()` returns the last one. `idle()`: whether the device has run out of work
    (the loader's cue to hand over a partial batch)."""

    def __init__(self):
        self.pending = None

    def swap(self, started):
        previous, self.pending = self.pending, started
        return previous

    def take(self):
        return self.swap(None)

    @staticmethod
    def finish(batch):
        """Waits for a batch `swap` or `take` returned (None: nothing to wait for)."""
        if batch is not None:
            batch()

    def idle(self):
        return self.pending is None or self.pending.done()


class Queued:
    """Everything queued on `device` so far, as `InFlight` holds it (a CPU has nothing to wait for)."""

    def __init__(self, device):
        self.event = ready_event(device)

    def done(self):
        return self.event is None or self.event.query()

    def __call__(self):
        if self.event is not None:
            self.event.synchronize()


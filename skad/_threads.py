"""A batch's images split over Python threads that run PyTorch on one thread each (CPU).

PyTorch splits each operation over its threads (OpenMP). On the small
operations of these detectors, each split costs more than it gains: on two
cores lite0's forward pass over 16 images at 256 px ran 1.25 to 1.5 times as
fast on two Python threads (one PyTorch thread and half the images each) as
on two PyTorch threads; PatchCore's scoring 1.35 times, GlobalLocal's 1.13 to
1.19 times (``examples/benchmarks/split_threads.py``; docs/benchmarks.md,
"Scoring on several threads"). :func:`split_batch` scores that way, with as many threads
as PyTorch would use (``torch.get_num_threads()``), so that
``OMP_NUM_THREADS`` and ``torch.set_num_threads`` keep their meaning. It
does so for work whose result per image does not depend on the other images
of the batch and that draws no random numbers: scoring and the features of
references.

PyTorch's thread count is per thread (OpenMP's) but also remembered for
threads that start later: :func:`thread_map` sets it back to the caller's
when its threads are done. Builds of PyTorch on its own thread pool rather
than OpenMP (``torch.__config__.parallel_info()``) keep one count for all
threads, which cannot be changed once set: there batches are not split.
"""

import functools
from concurrent.futures import ThreadPoolExecutor

import torch

__all__ = ["n_parts", "split_batch", "thread_map"]


def split_batch(fn, batch):
    """``fn(batch)``, computed on parts of ``batch``'s images on parallel threads.

    Parameters
    ----------
    fn : callable
        ``fn(images) -> out``: ``out`` a tensor with the images first (``r``
        rows per image), None, or a tuple or list of those. ``fn`` must
        compute each image's rows from that image alone (in another batch they
        may round differently, as PyTorch's kernels do), and must not draw
        random numbers or change shared state (it runs concurrently).
    batch : torch.Tensor of shape (B, ...)

    Returns
    -------
    ``fn(batch)``'s outputs: the parts' outputs concatenated in order, of the
    same type and shapes. The parts are as many as ``torch.get_num_threads()``,
    of at least two images each, and run on one PyTorch thread also where
    that leaves one part (two or three images): an image then scores the same
    in any batch of two or more, as on one thread (PyTorch convolves a single
    image, and on several threads also some batches, with other kernels,
    which round differently: by up to 3e-5 in lite0's features).
    ``fn(batch)`` on the calling thread, with PyTorch's threads, for a single
    image (the fastest way to score one; its kernels round differently from a
    batch's on any thread count), where PyTorch's thread count is 1, where
    ``batch`` is not on the CPU, where gradients are recorded (training) or
    where PyTorch does not run on OpenMP.
    """
    threads = torch.get_num_threads()
    if (threads <= 1 or len(batch) < 2 or batch.device.type != "cpu"
            or torch.is_grad_enabled() or not _openmp()):
        return fn(batch)
    return _concatenate(thread_map(fn, batch.tensor_split(n_parts(len(batch), threads))))


def n_parts(n_images, threads):
    """How many parts :func:`split_batch` makes of ``n_images`` images on ``threads``
    threads: one per thread, of two images at least (one part for fewer than four)."""
    return max(1, min(threads, n_images // 2))


def thread_map(fn, items):
    """``[fn(item) for item in items]`` on ``len(items)`` Python threads, each running PyTorch
    on one thread, in the caller's gradient and inference mode.

    Exceptions raised by ``fn`` reach the caller. PyTorch's thread count is the
    caller's again afterwards, also for threads started later.
    """
    caller_threads = torch.get_num_threads()
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def run(item):
        torch.set_num_threads(1)  # this thread's count (and, until reset, new threads')
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return fn(item)

    try:
        with ThreadPoolExecutor(max_workers=len(items), thread_name_prefix="skad") as pool:
            return list(pool.map(run, items))
    finally:
        torch.set_num_threads(caller_threads)


@functools.lru_cache(maxsize=1)
def _openmp():
    """Whether PyTorch runs its threads on OpenMP, whose thread count is per thread."""
    return "parallel backend: OpenMP" in torch.__config__.parallel_info()


def _concatenate(outs):
    """The parts' outputs of :func:`split_batch`, joined along the first dimension."""
    first = outs[0]
    if first is None:
        return None
    if isinstance(first, torch.Tensor):
        return torch.cat(outs)
    return type(first)(_concatenate(list(parts)) for parts in zip(*outs))

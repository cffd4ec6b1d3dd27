"""The training loop and its helpers, shared by every detector that trains.

:func:`train` runs epochs of optimiser steps over batches that a detector
supplies, with mixed precision on CUDA, a learning-rate schedule stepped per
epoch, progress when verbose (the loss beside the bar), each epoch's loss as a
DEBUG record of the ``skad._training`` logger, and a clear error when the loss
diverges.
Seeding is :mod:`skad._random`'s: the detectors seed the modules and
generators they pass in.
"""

import contextlib
import logging
import math

import torch

from ._progress import progress

logger = logging.getLogger(__name__)

__all__ = ["make_optimizer", "cosine_schedule", "warmup_step_schedule", "iter_minibatches",
           "train"]


def make_optimizer(module, learning_rate, weight_decay=0.0, betas=(0.9, 0.999), *,
                   decay_norm_and_bias=False):
    """AdamW; weight decay on weight matrices and kernels only, unless ``decay_norm_and_bias``.

    Without decay on norms and biases (parameters of one dimension) is timm's grouping,
    which MMR's released code uses; GeneralAD's decays every parameter.
    """
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 or decay_norm_and_bias else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas)


def cosine_schedule(optimizer, n_epochs, final_ratio=0.0):
    """Cosine decay per epoch from the base learning rate to ``final_ratio`` times it."""
    def factor(epoch):
        t = min(epoch / max(n_epochs, 1), 1.0)
        return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def warmup_step_schedule(optimizer, n_warmup, milestones=(), gamma=0.1):
    """Linear warm-up from 0 over ``n_warmup`` epochs, then x ``gamma`` from each milestone.

    As MMR's released schedule: epoch ``e`` (from 0) runs at ``e / n_warmup`` of the base
    rate while ``e < n_warmup`` (the first epoch at 0), and the rate is divided at the end
    of the epoch numbered ``m`` counting from 1 (``e + 1 >= m``).
    """
    def factor(epoch):
        if epoch < n_warmup:
            return epoch / n_warmup
        return gamma ** sum(epoch + 1 >= m for m in milestones)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def iter_minibatches(n, batch_size, generator, *, drop_last=False):
    """Shuffled index batches over ``range(n)`` drawn with a torch ``generator``."""
    order = torch.randperm(n, generator=generator)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        yield order[start:start + batch_size]


def train(module, step, *, n_epochs, batches, optimizer, scheduler=None, device,
          verbose=0, desc="training", grad_clip=None):
    """Train ``module`` and return the mean loss of each epoch.

    Parameters
    ----------
    module : torch.nn.Module
        Put in train mode for the loop and in eval mode after it.
    step : callable
        ``step(batch) -> loss`` (a scalar tensor) for one item of ``batches``.
    n_epochs : int
    batches : callable
        ``batches(epoch) -> iterable`` of whatever ``step`` takes.
    optimizer : torch.optim.Optimizer
    scheduler : LR scheduler, optional
        Stepped once per epoch.
    device : torch.device
        Mixed precision (bfloat16 autocast) is used on CUDA.
    verbose : int
        A progress bar of the epochs on stderr, with the last epoch's loss
        (:func:`skad._progress.progress`).
    grad_clip : float, optional
        Clip the gradient norm to this value.

    Raises
    ------
    FloatingPointError
        When the loss becomes NaN or infinite.
    """
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    history = []
    epochs = progress(range(n_epochs), desc=desc, verbose=verbose, unit="epoch",
                      status=lambda: f"loss {history[-1]:.4f}", interval=0)
    module.train()
    try:
        for epoch in epochs:
            total, count = 0.0, 0
            for batch in batches(epoch):
                with autocast:
                    loss = step(batch)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"{desc}: the loss became {loss.item()} at epoch {epoch + 1}; "
                        "lower the learning rate or check the input images"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(module.parameters(), grad_clip)
                optimizer.step()
                total, count = total + loss.item(), count + 1
            if scheduler is not None:
                scheduler.step()
            history.append(total / max(count, 1))
            logger.debug("%s: epoch %d/%d, loss %.4f", desc, epoch + 1, n_epochs, history[-1])
    finally:
        epochs.close()  # ends the bar's line now, before an error's message is shown
        module.eval()
    return history

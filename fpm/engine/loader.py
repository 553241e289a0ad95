"""The training loop's DataLoader: the step-addressed sampler over a dataset, from any step.

The data stream is a pure function of the (data) step (:class:`fpm.data.datasets.StreamSampler`),
so a resumed or rolled-back run reads exactly what an uninterrupted one reads. The loader has its
own generator: drawing its worker seed from the global RNG would shift the dropout stream of a
resumed run (the loader is created after the RNG is restored). Its workers ignore the stop signals
(the main process checkpoints; :mod:`fpm.engine.signals`), and :func:`shutdown` stops them at once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fpm.data.datasets import StreamSampler
from fpm.engine.signals import ignore_in_worker, register_exit_kill
from fpm.engine.spec import TrainSpec


def data_loader(dataset, spec: TrainSpec, rank: int, world_size: int, start_step: int,
                data_step: Callable[[int], int]) -> torch.utils.data.DataLoader:
    """This rank's micro-batches from optimizer step ``start_step`` on; ``data_step`` maps a step to
    the data it reads (the loss-spike guard skips windows). A dataset may collate its own way
    (fine-tuning pads each micro-batch to its longest row)."""
    s = spec
    sampler = StreamSampler(s.global_batch, s.micro_batch, s.grad_accum, rank, world_size, start_step, s.max_steps,
                            data_step=data_step)
    if s.num_workers:
        register_exit_kill()
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=s.num_workers,
                                       collate_fn=getattr(dataset, "collate", None),
                                       generator=torch.Generator().manual_seed(s.seed),
                                       worker_init_fn=ignore_in_worker, pin_memory=torch.cuda.is_available(),
                                       prefetch_factor=4 if s.num_workers else None, persistent_workers=False)


def shutdown(loader) -> None:
    """Stop a DataLoader iterator's workers now (on an error the iterator would otherwise live on
    in the traceback, and its workers, which ignore SIGTERM, until exit)."""
    stop = getattr(loader, "_shutdown_workers", None)
    if stop is not None:
        stop()

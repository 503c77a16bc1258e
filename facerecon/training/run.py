"""``facerecon train`` as one call: data preparation, split, then the R-Net (base or multi-level),
C-Net or LAP trainer.

Its own module so that :mod:`facerecon.training.trainer` (the R-Net trainer) and
:mod:`facerecon.training.cnet_training` (built on it) do not import each other.
"""

from __future__ import annotations

from facerecon.errors import InputError
from facerecon.training import distributed
from facerecon.training.cnet_training import CNetTrainer
from facerecon.training.config import TrainConfig
from facerecon.training.corrective_training import MultiLevelTrainer
from facerecon.training.lap_training import LapTrainer
from facerecon.training.trainer import Trainer, TrainSummary, load_faces, prepare_data, split_validation


def run_training(config: TrainConfig, device: str = "auto", resume: bool = False, progress=None,
                 should_stop=None) -> tuple[TrainSummary, Trainer]:
    """The whole ``facerecon train`` run, in one process or as one rank under torchrun.

    Rank 0 prepares the data (detecting image folders) while the others wait; every rank then
    loads the detections, builds the same split and trains on its share of each batch. Returns
    the summary and the trainer (its network holds the final weights).
    """
    if config.cnet is not None and distributed.env_ranks()[0] > 1:
        raise InputError("C-Net training ([cnet] enabled = true) runs in one process; start it without torchrun")
    if config.lap is not None and distributed.env_ranks()[0] > 1:
        raise InputError("LAP training ([lap] enabled = true) runs in one process; start it without torchrun")
    ctx = distributed.setup(device, config.dist_backend, config.dist_timeout_minutes)
    try:
        files = distributed.on_main(ctx, lambda: prepare_data(config, should_stop=should_stop))
        faces = load_faces(files, config.group_by)
        train_set, valid_set = split_validation(faces, config.validation_fraction)
        if config.lap is not None:
            trainer = LapTrainer(config, ctx.device)
        elif config.cnet is not None:
            trainer = CNetTrainer(config, ctx.device)
        elif config.correctives is not None:
            trainer = MultiLevelTrainer(config, ctx.device, ctx)
        else:
            trainer = Trainer(config, ctx.device, ctx)
        summary = trainer.run(train_set, valid_set, resume, progress=progress if ctx.is_main else None,
                              should_stop=should_stop)
    finally:
        distributed.teardown(ctx)
    return summary, trainer

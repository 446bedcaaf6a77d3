"""Training and transfer learning for MRH-Net: one process, torchrun/DDP, or multi-node.

The paper recipe (``recipe="paper"``, MRH_training.m exactly): SGD momentum 0.9, lr 0.1,
x0.1 every 10 epochs, L2 1e-4 on weights (not biases), gradient L2-norm clip 0.01
applied to each parameter tensor separately, mini-batch 128, Glorot init, and
MATLAB's regression loss (half the sum of squared errors over the PxP outputs,
averaged over the batch). The loss scale is part of the recipe: with torch's
element-mean MSE the same lr and clip threshold mean 9x smaller gradients. The
default recipe, "robust", trains the same way on each brain scaled by its own robust
range (``norm="subject-percentile"``), which the recipe study found transfers best to a
brain from another scanner (docs/recipes.md).

Distributed: launched under ``torchrun`` (RANK/WORLD_SIZE in the environment) the
trainer joins a process group (nccl on CUDA, gloo on CPU), wraps the model in
DDP; each rank takes its slice of the PatchStream's global batches, which depend on
(seed, epoch) only, so a run resumes on any number of processes. ``batch_size`` is the
GLOBAL batch (each rank takes batch_size / world_size), so lr and clip keep
their meaning whatever the number of processes.

Run directory::

    RUNDIR/config.json        resolved parameters
    RUNDIR/checkpoints/last.pt  model, optimiser, schedule position, RNG, history (atomic)
    RUNDIR/metrics.csv|json    one row per epoch
    RUNDIR/curve.png           training curve
    RUNDIR/model.pt            the model bundle (mrhscale.io.bundle)

A checkpoint is written after every epoch and on SIGTERM (after the current
step, then the process exits non-zero so a batch scheduler can requeue it);
``resume=True`` continues from it and ends where an uninterrupted run would:
the global batches are a function of (seed, epoch) and the stream starts at the
first one not done, whatever the number of processes now (another number gives
the same batches; the weights then differ by float rounding only).
"""

from mrhscale.training.api import check_compatible, finetune, train
from mrhscale.training.config import TrainConfig, TrainingInterrupted
from mrhscale.training.loop import Runtime

__all__ = ["Runtime", "TrainConfig", "TrainingInterrupted", "check_compatible", "finetune", "train"]

"""Training: losses, optimisers, train steps, sharding, checkpoints, data."""

from .checkpoint import CheckpointManager as CheckpointManager
from .checkpoint import load_train_state as load_train_state
from .checkpoint import save_train_state as save_train_state
from .loop import fit as fit
from .loop import plot_losses as plot_losses
from .losses import head_loss as head_loss
from .losses import mask_tokens as mask_tokens
from .optim import adamw as adamw
from .optim import decay_mask as decay_mask
from .optim import warmup_cosine as warmup_cosine
from .sharding import make_mesh as make_mesh
from .sharding import make_sharded_train_step as make_sharded_train_step
from .sharding import shard_batch as shard_batch
from .sharding import shard_state as shard_state
from .step import TrainState as TrainState
from .step import init_state as init_state
from .step import make_train_step as make_train_step

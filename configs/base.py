"""Shared training settings: the original system's defaults (design notes), dataset configs override a few.

Not used on its own: see configs/dcase.py and configs/music.py.
"""

import ml_collections


def get_config(arg=None):
  config = ml_collections.ConfigDict()
  config.features_dir = ''  # A preprocessing --output_dir; required.
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  # DCASE development set: train on fold k's train part and hold its evaluate clips out for monitoring (0: train
  # on all four folds, nothing held out). Folder data trains on 'train' and holds out 'test'.
  config.data.fold = 1
  config.data.tile_seconds = 5.0  # 498 frames at 100 frames/s.
  config.data.neighbour_seconds = 5.0  # A neighbour starts within +-5 s of its anchor.
  config.data.cross_clip_neighbours = True  # Neighbours may cross into the next clip of the same recording.
  config.data.distant_other_group = True  # Distant tiles from another session/song, not just another file.
  # Label-free tile augmentations (dem_jax/augment.py), off in the original: shifts of up to +-freq_shift mel
  # bands, up to a `mixup` fraction of another tile of the batch mixed in, a smooth gain curve of up to +-eq_db
  # decibels over the bands, a stretch of the time axis by up to 1 / (1 - time_stretch), and SpecAugment's masks of
  # up to freq_mask bands and up to a time_mask fraction of the frames, a room of reverberation time up to `reverb`
  # seconds, and a low-pass edge in the top `low_pass` fraction of the bands.
  config.data.augment = ml_collections.ConfigDict({'freq_shift': 0, 'mixup': 0.0, 'eq_db': 0.0,
                                                   'time_stretch': 0.0, 'freq_mask': 0, 'time_mask': 0.0,
                                                   'reverb': 0.0, 'low_pass': 0.0})
  # Where the packed float16 training split lives: 'device' (every local device holds it; the step cuts its own
  # tiles), 'host' (host memory, streamed two calls ahead), 'stream' (nothing packed: each process keeps a window
  # of at most resident_gb of its share of the recordings, turned over as it trains; distant tiles come from the
  # window), or 'auto' (stream when the packed split exceeds host_memory_fraction of the host's memory, else
  # device when it fits in device_memory_fraction of one device's memory, else host).
  config.data.store = 'auto'
  config.data.device_memory_fraction = 0.5
  config.data.host_memory_fraction = 0.5  # 'auto' streams above this share of the host's memory.
  config.data.resident_gb = 4.0  # 'stream': GiB of recordings each process holds (window and next segment).
  config.data.eval_batches = 4  # Held-out triplet batches per evaluation.
  config.data.eval_max_clips = 400  # Labelled held-out clips embedded for the silhouette score.

  config.model = ml_collections.ConfigDict()
  config.model.name = 'resnet18'
  config.model.width = 1.0  # Channel multiplier: 1.0 is 64-128-256-512.
  config.model.embedding_dim = 128
  config.model.dropout_rate = 0.5
  config.model.head_hidden = 0  # 0: one dense layer after pooling (the original's); N: a hidden layer of N and a ReLU.
  config.model.conv_impl = 'auto'  # oneDNN on CPU (dem_jax.ops.onednn), XLA's convolution on GPU/TPU.
  config.model.dtype = 'auto'  # bfloat16 on GPU/TPU (parameters, statistics and loss stay float32), float32 on CPU.

  config.loss = ml_collections.ConfigDict()
  config.loss.name = 'triplet'  # 'triplet' (squared distances, mean over active), 'tile2vec', 'batch_all',
  # 'batch_hard' or 'infonce' (dem_jax/losses.py; docs/quality.md compares them).
  config.loss.margin = 1.0
  config.loss.l2 = 0.01  # tile2vec only: weight of the embedding-norm penalty.
  config.loss.temperature = 0.1  # infonce only: softmax temperature over cosine similarities.
  config.loss.debias = 0.0  # infonce only: expected share of same-class negatives, corrected for (0 = off).

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.learning_rate = 1e-4
  config.optimizer.schedule = 'staircase'  # The original's; or 'cosine' (warm-up, then a half cosine).
  config.optimizer.decay_rate = 0.95  # Staircase: x0.95 every decay_steps.
  config.optimizer.decay_steps = 7500
  config.optimizer.warmup_steps = 0  # Cosine: linear warm-up steps.
  config.optimizer.final_fraction = 0.0  # Cosine: the last learning rate, as a fraction of learning_rate.
  config.optimizer.schedule_steps = 0  # Cosine: its length; 0: the run's (num_steps, or what the budget reaches).
  config.optimizer.weight_decay = 1e-4  # On every conv and dense kernel.
  config.optimizer.grad_clip_norm = 0.0  # 0: off.

  config.batch_size = 64  # Global, across all devices and hosts.
  config.num_epochs = 20
  config.num_steps = 0  # > 0 overrides num_epochs.
  config.train_minutes = 0.0  # > 0: stop after this much training time (compilation excluded), with a checkpoint.
  config.parallel = 'jit'  # 'jit' over a mesh of every device, or 'pmap' over the local devices.
  config.steps_per_dispatch = 0  # Steps per compiled call; 0: 1 on CPU, 16 on GPU/TPU.

  config.log_every = 50
  config.eval_every = 0  # 0: once per epoch.
  config.checkpoint_every = 1000
  config.keep_checkpoints = 3
  return config


def shrink_for_cpu(config):
  """`:tiny`: the same pipeline, small enough to train in about a minute on a laptop CPU (a smoke run)."""
  config.data.tile_seconds = 1.0
  config.data.neighbour_seconds = 1.0
  config.data.eval_batches = 2
  config.data.eval_max_clips = 200
  config.model.width = 0.125
  config.model.embedding_dim = 32
  config.model.dropout_rate = 0.1
  config.optimizer.learning_rate = 1e-3
  config.optimizer.decay_steps = 100
  config.batch_size = 32
  config.num_steps = 300
  config.log_every = 25
  config.eval_every = 100
  config.checkpoint_every = 100
  return config


def cpu_recipe(config):
  """`:cpu`: the recipe chosen for 15 minutes of training on a small CPU (docs/quality.md has the rounds and figures).

  Chosen with `dem-jax bench quality` on real music at equal CPU time, ranked by how well the clusters follow the
  classes over several training seeds: ResNet18 at width 0.25, 1-s tiles with neighbours within +-4 s,
  band shifts of up to +-8 and gain curves of up to +-6 dB, batch 32, InfoNCE at temperature 1.0, Adam with a cosine
  schedule, and ten times the original's L2 penalty on the kernels. It stops after 30 passes over the training tiles
  or the 15-minute budget, whichever ends first. It is tuned for clustering with the pooled trunk features
  (`model_trunk`); `--config.optimizer.weight_decay=1e-4` gives the earlier recipe, better for retrieval with the
  embedding.
  """
  shrink_for_cpu(config)
  config.data.neighbour_seconds = 4.0
  config.data.augment.freq_shift = 8
  config.data.augment.eq_db = 6.0
  config.model.width = 0.25
  config.model.embedding_dim = 128
  config.model.dropout_rate = 0.1  # :tiny's; none and 0.7 both lowered the medians (ninth round).
  config.loss.name = 'infonce'
  config.loss.temperature = 1.0
  config.optimizer.learning_rate = 1e-3
  config.optimizer.weight_decay = 1e-3  # Ten times the original's: the trunk clusters by family better (twelfth round).
  config.optimizer.schedule = 'cosine'  # Over the steps the budget reaches, re-estimated as the run goes.
  config.optimizer.warmup_steps = 200
  config.train_minutes = 15.0
  # 30 passes over the training tiles, or the budget, whichever ends first. On a large set (DCASE's development set
  # holds 200 hours: over 10,000 steps per pass) the budget ends the run; on the 58 minutes of the quality set's
  # training split, training on past 30 passes lowered the clusters' agreement with the classes (docs/quality.md,
  # sixth round).
  config.num_epochs = 30
  config.num_steps = 0
  config.log_every = 100
  config.eval_every = 5000  # Held-out monitoring counts against the budget: rarely.
  config.checkpoint_every = 2000
  return config

"""The same ResNet and triplet step in PyTorch eager: the speed reference for the JAX benchmarks.

Standalone on purpose (imports only torch and numpy): torch is not a dem_jax dependency, so the benchmarks run this
file as a subprocess with whichever interpreter has torch (`--torch_python`). Prints one JSON line, last.

With --dtype=bfloat16 it runs what a PyTorch user on a CPU would: bfloat16 autocast (parameters, BatchNorm and the
loss stay float32) with the model and input in channels_last, the layout oneDNN's fast kernels use.

    .venv-torch/bin/python dem_jax/benchmarks/torch_reference.py --mode=train_step --batch=32 --frames=64 --mels=128
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

STAGE_SIZES = {'resnet18': (2, 2, 2, 2), 'resnet34': (3, 4, 6, 3)}


class BasicBlock(nn.Module):

  def __init__(self, cin, cout, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout)
    self.shortcut = None
    if stride != 1 or cin != cout:
      self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return F.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class ResNet(nn.Module):
  """Mirror of dem_jax.models.ResNet: [B, T, M] log-Mel -> L2-normalised [B, embedding_dim]."""

  def __init__(self, stage_sizes, width=1.0, embedding_dim=128, dropout_rate=0.5, channels_last=False):
    super().__init__()
    self.channels_last = channels_last
    c = [max(1, int(round(f * width))) for f in (64, 128, 256, 512)]
    self.stem = nn.Sequential(nn.Conv2d(1, c[0], 7, 2, 3, bias=False), nn.BatchNorm2d(c[0]), nn.ReLU(),
                              nn.MaxPool2d(3, 2, 1))
    blocks, cin = [], c[0]
    for i, n in enumerate(stage_sizes):
      for j in range(n):
        blocks.append(BasicBlock(cin, c[i], 2 if i > 0 and j == 0 else 1))
        cin = c[i]
    self.blocks = nn.Sequential(*blocks)
    self.dropout = nn.Dropout(dropout_rate)
    self.head = nn.Linear(cin, embedding_dim)

  def forward(self, x):
    x = x[:, None]
    if self.channels_last:
      x = x.contiguous(memory_format=torch.channels_last)
    x = self.blocks(self.stem(x))
    x = self.head(self.dropout(x.mean(dim=(2, 3))))
    return F.normalize(x, dim=-1)


def triplet_loss(za, zn, zd, margin=1.0):
  per = F.relu((za - zn).pow(2).sum(-1) - (za - zd).pow(2).sum(-1) + margin)
  active = (per > 0).float()
  return (per * active).sum() / active.sum().clamp(min=1.0)


def retain_freed_memory():
  """Same malloc setting as dem_jax.process.retain_freed_memory, so both sides of a comparison run alike."""
  import ctypes
  libc = ctypes.CDLL('libc.so.6')
  # M_ARENA_MAX, M_MMAP_MAX, M_TRIM_THRESHOLD; what the environment set (the dispatcher) stays, as on the JAX side.
  settings = {'MALLOC_ARENA_MAX': (-8, 1), 'MALLOC_MMAP_MAX_': (-4, 0), 'MALLOC_TRIM_THRESHOLD_': (-1, 2**31 - 1)}
  for name, (param, value) in settings.items():
    if name not in os.environ:
      libc.mallopt(param, value)


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--mode', choices=('train_step', 'embed'), default='train_step')
  p.add_argument('--model', default='resnet18', choices=sorted(STAGE_SIZES))
  p.add_argument('--batch', type=int, default=32)
  p.add_argument('--frames', type=int, default=64)
  p.add_argument('--mels', type=int, default=128)
  p.add_argument('--width', type=float, default=1.0)
  p.add_argument('--steps', type=int, default=10)
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--threads', type=int, default=os.cpu_count())
  p.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'),
                 help='bfloat16: autocast to bfloat16 with channels_last (float32: plain eager, NCHW)')
  p.add_argument('--retain_memory', action='store_true')
  p.add_argument('--serve', action='store_true',
                 help='after warm-up print {"ready": ...}, then for every line "N" read from stdin run one '
                 'untimed step and time N more')
  a = p.parse_args()

  if a.retain_memory:
    retain_freed_memory()
  torch.manual_seed(0)
  torch.set_num_threads(a.threads)
  bf16 = a.dtype == 'bfloat16'
  model = ResNet(STAGE_SIZES[a.model], a.width, channels_last=bf16)
  if bf16:
    model = model.to(memory_format=torch.channels_last)
  autocast = lambda: torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16)
  rng = np.random.default_rng(0)
  shape = (a.batch, a.frames, a.mels)

  if a.mode == 'train_step':
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    tiles = [torch.from_numpy(rng.normal(size=shape).astype(np.float32)) for _ in range(3)]

    def step():
      with autocast():
        z = model(torch.cat(tiles))  # one forward pass for the three roles, as the JAX step does
        za, zn, zd = z.float().split(a.batch)
        loss = triplet_loss(za, zn, zd)
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt.step()
      return loss.item()
  else:
    model.eval()
    x = torch.from_numpy(rng.normal(size=shape).astype(np.float32))

    def step():
      with torch.inference_mode(), autocast():
        return float(model(x)[0, 0])

  def seconds_per_step(n):
    t0 = time.perf_counter()
    for _ in range(n):
      step()
    return (time.perf_counter() - t0) / n

  info = {'torch_version': torch.__version__, 'threads': torch.get_num_threads(),
          'recipe': 'bfloat16 autocast, channels_last' if bf16 else 'float32 eager'}
  for _ in range(a.warmup):
    step()
  if a.serve:
    print(json.dumps(dict(info, ready=True)), flush=True)
    for line in sys.stdin:
      if not line.strip():
        break
      step()  # untimed: the first step after a pause pays for memory the OS reclaimed meanwhile
      print(json.dumps({'seconds_per_step': seconds_per_step(int(line))}), flush=True)
    return
  dt = seconds_per_step(a.steps)
  result = dict(info, seconds_per_step=dt)
  result['triplets_per_s' if a.mode == 'train_step' else 'segments_per_s'] = a.batch / dt
  print(json.dumps(result))


if __name__ == '__main__':
  main()

"""The feature store that preprocessing writes and everything else reads.

On disk, in one output folder:
- `features.zarr/`: one zarr v3 array [frames, n_mels] (float16 by default), sharded, holding every clip's frames,
  written with tensorstore. Clips lie in the manifest's order; the frame axis may have unused gaps between blocks
  (they are never read and take no disk space).
- `manifest.csv`: one row per written clip: clip_id, path, label, group, recording, position, split,
  frame_offset, num_frames, duration, plus any extra columns of a split file.
- `features.json`: settings (front end, dataset, storage), labels, per-band sums per split from which
  normalisation statistics are derived, and the manifest's sha256. It is written last: a folder without it is not a
  finished output, and a manifest that does not match it is refused.
- `summary.json`: what the run did (clips written, failures with reasons, audio seconds, wall seconds, settings).

    features = open_features('/data/dcase_features')
    frames = features.read('DevNode1_ex1_1')            # float32 [998, 128]
    tile = features.read('DevNode1_ex1_1', 100, 598)     # frames 100..597
    mean, std = features.norm_stats()                    # over the training part

The store may also be read where tensorstore reads, by a kvstore URL instead of a path: `file://`, `http(s)://`
(read-only), `gs://` and `s3://` (credentials from the environment: GOOGLE_APPLICATION_CREDENTIALS or the machine's
gcloud login, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE / AWS_REGION). The side files are then read
through tensorstore's kvstore too. Preprocessing writes to a local folder only.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import re
from typing import Iterable, Sequence

import numpy as np
import tensorstore as ts

from dem_jax.frontend import FrontEnd

ARRAY_NAME = 'features.zarr'
MANIFEST_NAME = 'manifest.csv'
INFO_NAME = 'features.json'
SUMMARY_NAME = 'summary.json'
MANIFEST_COLUMNS = ('clip_id', 'path', 'label', 'group', 'recording', 'position', 'split', 'frame_offset',
                    'num_frames', 'duration')


class FeaturesError(Exception):
  """A features folder that is missing, unfinished or inconsistent."""


# Remote reads retry a few times, so that a passing glitch is ridden out and an unreachable address fails in
# seconds (tensorstore's own default keeps retrying for minutes).
_REMOTE_RETRIES = {'max_retries': 4, 'initial_delay': '0.5s', 'max_delay': '4s'}
_REMOTE_FIX = ('check the address and the network; gs:// reads GOOGLE_APPLICATION_CREDENTIALS (or the gcloud '
               'login), s3:// AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and AWS_REGION')


def is_url(location: str) -> bool:
  """Whether `location` is a tensorstore kvstore URL (http(s)://, gs://, s3://) rather than a local path."""
  return '://' in location and not location.startswith('file://')


def store_context(cache_bytes: int) -> ts.Context:
  """The tensorstore context every read of a store uses: a chunk cache of `cache_bytes`, bounded retries."""
  return ts.Context({'cache_pool': {'total_bytes_limit': cache_bytes}, 'http_request_retries': _REMOTE_RETRIES,
                     'gcs_request_retries': _REMOTE_RETRIES, 's3_request_retries': _REMOTE_RETRIES})


@dataclasses.dataclass(frozen=True)
class Clip:
  """One clip of a feature store: where its frames are and what is known about it."""
  clip_id: str
  path: str
  label: str
  group: str
  recording: str
  position: int
  split: str
  frame_offset: int
  num_frames: int
  duration: float
  extra: tuple[tuple[str, str], ...] = ()


def array_spec(path: str, *, num_frames: int, n_mels: int, dtype: str, chunk_frames: int, shard_frames: int,
               compression: str) -> dict:
  """tensorstore spec of the features array: sharded zarr v3, shards of `shard_frames` rows.

  Shards are the unit a writer owns: preprocessing blocks start on shard boundaries, so no two writers ever touch
  the same shard file.
  """
  inner = [{'name': 'bytes', 'configuration': {'endian': 'little'}}]
  if compression == 'zstd':
    inner.append({'name': 'zstd', 'configuration': {'level': 3}})
  elif compression == 'blosc':
    inner.append({'name': 'blosc', 'configuration': {'cname': 'lz4', 'clevel': 5, 'shuffle': 'shuffle',
                                                     'typesize': np.dtype(dtype).itemsize}})
  elif compression != 'none':
    raise ValueError(f'storage.compression={compression!r}; choose zstd, blosc or none.')
  return {
      'driver': 'zarr3',
      'kvstore': {'driver': 'file', 'path': path},
      # Every chunk written, zeros too: a chunk missing from its shard is then damage, which the streamed reader
      # refuses (it reads with fill_missing_data_reads=False).
      'store_data_equal_to_fill_value': True,
      'metadata': {
          'shape': [num_frames, n_mels],
          'data_type': dtype,
          'chunk_grid': {'name': 'regular', 'configuration': {'chunk_shape': [shard_frames, n_mels]}},
          'chunk_key_encoding': {'name': 'default'},
          'fill_value': 0,
          'codecs': [{'name': 'sharding_indexed', 'configuration': {
              'chunk_shape': [chunk_frames, n_mels],
              'codecs': inner,
              'index_codecs': [{'name': 'bytes', 'configuration': {'endian': 'little'}}, {'name': 'crc32c'}],
              'index_location': 'end',
          }}],
          'dimension_names': ['frame', 'mel'],
      },
  }


def read_manifest(path: str, text: str | None = None) -> list[Clip]:
  """The clips of a manifest (the file at `path`, or its `text` when read elsewhere); FeaturesError naming the file
  and line when it cannot be read."""
  try:
    if text is None:
      with open(path, newline='', encoding='utf-8') as f:
        rows = list(csv.DictReader(f))
    else:
      rows = list(csv.DictReader(io.StringIO(text, newline='')))
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    raise FeaturesError(f'{path} cannot be read ({e}); run the preprocessing job again with --finalize to rewrite '
                        'it.') from None
  clips = []
  for n, row in enumerate(rows, 2):
    extra = tuple(sorted((k, v) for k, v in row.items() if k not in MANIFEST_COLUMNS and k is not None))
    try:
      clips.append(Clip(clip_id=row['clip_id'], path=row['path'], label=row['label'], group=row['group'],
                        recording=row['recording'], position=int(row['position']), split=row['split'],
                        frame_offset=int(row['frame_offset']), num_frames=int(row['num_frames']),
                        duration=float(row['duration']), extra=extra))
    except (KeyError, TypeError, ValueError) as e:
      raise FeaturesError(f'{path}:{n}: not a manifest row ({e!r}); run the preprocessing job again with '
                          '--finalize to rewrite it.') from None
  return clips


def write_manifest(path: str, clips: Sequence[Clip]) -> None:
  extra_columns = sorted({k for c in clips for k, _ in c.extra})
  tmp = path + '.tmp'
  with open(tmp, 'w', newline='', encoding='utf-8') as f:
    writer = csv.writer(f)
    writer.writerow(list(MANIFEST_COLUMNS) + extra_columns)
    for c in clips:
      extra = dict(c.extra)
      writer.writerow([c.clip_id, c.path, c.label, c.group, c.recording, c.position, c.split, c.frame_offset,
                       c.num_frames, f'{c.duration:.6f}'] + [extra.get(k, '') for k in extra_columns])
  os.replace(tmp, path)


def stats_from_sums(count: float, total: np.ndarray, total_sq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  if count <= 0:
    raise FeaturesError('No frames to compute normalisation statistics from (the selected splits are empty).')
  mean = total / count
  var = np.maximum(total_sq / count - mean ** 2, 0.0)
  return mean.astype(np.float32), np.sqrt(var).astype(np.float32)


def training_splits(splits: Iterable[str], fold: int | None = None) -> list[str]:
  """The splits that form the training part: 'train' for folder data; for the DCASE development set every fold
  except `fold` (all four when fold is None: the label-free embedding's usual training set) and the clips in no
  fold ('none'); else all of them."""
  present = sorted(set(splits))
  # A split word of no reader (a split file's 'Train', say) would otherwise put every clip in the training part.
  unknown = [s for s in present if s not in ('train', 'test', 'none', 'eval') and not re.fullmatch(r'fold\d+', s)]
  if unknown:
    raise FeaturesError(f'the store holds the split(s) {unknown}, which no reader writes (folder data: train or '
                        'test; DCASE: fold1-fold4, none, eval); fix the split file and preprocess again.')
  if any(s.startswith('fold') for s in present):
    # 'none': clips of meta.txt in no evaluate list, never scored, so free to train on.
    return [s for s in present if (s.startswith('fold') and s != f'fold{fold}') or s == 'none']
  if 'train' in present:
    return ['train']
  return present


class Features:
  """A finished preprocessing output, opened for reading. Cheap to open; reads go through tensorstore."""

  def __init__(self, root: str, *, cache_bytes: int = 256 << 20):
    if root.startswith('file://'):
      root = root[len('file://'):]
    self.remote = is_url(root)
    self.root = root.rstrip('/') if self.remote else os.path.abspath(root)
    self._context = store_context(cache_bytes)
    if self.remote:
      try:
        self._kvstore = ts.KvStore.open(self.root + '/', context=self._context).result()
      except ValueError as e:
        raise FeaturesError(f'{self.root} is not a store address tensorstore can open ({e}); use a path or a '
                            'file://, http(s)://, gs:// or s3:// URL.') from None
    info_path = os.path.join(self.root, INFO_NAME)
    if not self.remote and not os.path.isdir(self.root):
      raise FeaturesError(f'Features folder {self.root} does not exist; run `dem-jax preprocess` first and '
                          'point at its --output_dir.')
    self.info_bytes = self._read_side(INFO_NAME)
    if self.info_bytes is None:
      raise FeaturesError(f'{self.root} is not a finished preprocessing output ({INFO_NAME} is missing). If the job '
                          'ran as several tasks, run it once more with --finalize; if it was interrupted, run the '
                          'same command again to finish it.')
    refinalize = (f'run the preprocessing job for {self.root} again with --finalize to rewrite it (or the same '
                  'command as before)')
    try:
      self.info = json.loads(self.info_bytes.decode('utf-8'))
    except (ValueError, UnicodeDecodeError) as e:
      raise FeaturesError(f'{info_path} is damaged ({e}); {refinalize}.') from None
    self.frontend = FrontEnd(**self.info['frontend'])
    self.labels: list[str] = list(self.info['labels'])
    self.dataset: str = self.info['dataset']
    manifest_path = os.path.join(self.root, MANIFEST_NAME)
    manifest = self._read_side(MANIFEST_NAME)
    if manifest is None:
      raise FeaturesError(f'{self.root} has {INFO_NAME} but no {MANIFEST_NAME}; {refinalize}.')
    if 'manifest_sha256' in self.info:  # Stores written before the digest existed are opened as they are.
      if hashlib.sha256(manifest).hexdigest() != self.info['manifest_sha256']:
        raise FeaturesError(f'{manifest_path} does not match {INFO_NAME} (another run\'s or edited); {refinalize}.')
    try:
      text = manifest.decode('utf-8')
    except UnicodeDecodeError as e:
      raise FeaturesError(f'{manifest_path} cannot be read ({e}); {refinalize}.') from None
    self.clips: list[Clip] = read_manifest(manifest_path, text)
    if len(self.clips) != self.info.get('num_clips', len(self.clips)):
      raise FeaturesError(f'{manifest_path} lists {len(self.clips)} clips, {INFO_NAME} says '
                          f'{self.info["num_clips"]}; {refinalize}.')
    total = self.info.get('total_frames')
    outside = [c.clip_id for c in self.clips if total is not None and c.frame_offset + c.num_frames > total]
    if outside:
      raise FeaturesError(f'{manifest_path} places {outside[0]} beyond the {total} frames of {ARRAY_NAME}; '
                          f'{refinalize}.')
    if not self.remote:  # Remote stores have no cheap listing; there a missing shard fails its read instead.
      check_store_files(self.root, self.info.get('store_files'))
    self._index = {c.clip_id: i for i, c in enumerate(self.clips)}
    self._array = self.open_array(fill_missing=not self.remote)

  def _read_side(self, name: str) -> bytes | None:
    """The bytes of a side file (features.json, manifest.csv), None when it is missing."""
    if not self.remote:
      path = os.path.join(self.root, name)
      if not os.path.exists(path):
        return None
      with open(path, 'rb') as f:
        return f.read()
    try:
      result = self._kvstore.read(name).result()
    except ValueError as e:
      raise FeaturesError(f'{self.root}/{name} cannot be read ({e}); {_REMOTE_FIX}.') from None
    return result.value if result.state == 'value' else None

  def open_array(self, *, context: ts.Context | None = None, fill_missing: bool = True) -> ts.TensorStore:
    """A tensorstore handle of the features array. fill_missing=False turns a read of a lost shard into an error
    instead of the fill value (zeros): preprocessing never leaves a clip's chunks unwritten, so a missing one is
    damage. FeaturesError when the array cannot be opened (an unreachable address, no credentials)."""
    location = self.root + '/' + ARRAY_NAME + '/'
    kvstore = location if self.remote else {'driver': 'file', 'path': os.path.join(self.root, ARRAY_NAME)}
    try:
      return ts.open({'driver': 'zarr3', 'kvstore': kvstore, 'recheck_cached_data': False,
                      'fill_missing_data_reads': fill_missing}, context=context or self._context, read=True).result()
    except ValueError as e:
      fix = _REMOTE_FIX if self.remote else 'preprocess again into a new --output_dir'
      raise FeaturesError(f'The features array {location} cannot be opened ({e}); {fix}.') from None

  def __len__(self) -> int:
    return len(self.clips)

  def __repr__(self) -> str:
    return f'Features({self.root!r}, {len(self.clips)} clips, {self.n_mels} mel bands, dataset={self.dataset})'

  @property
  def n_mels(self) -> int:
    return self.frontend.n_mels

  @property
  def frame_rate(self) -> float:
    return self.frontend.frame_rate

  def clip(self, clip_id: str) -> Clip:
    try:
      return self.clips[self._index[clip_id]]
    except KeyError:
      raise KeyError(f'No clip {clip_id!r} in {self.root}.') from None

  def audio_path(self, clip: Clip) -> str:
    """Where the clip's audio file was read from (to listen to it)."""
    return os.path.join(self.info.get('data_dir', ''), clip.path)

  def clip_index(self, clip_id: str) -> int:
    return self._index[clip_id]

  def label_index(self, label: str) -> int:
    """Position of `label` in `self.labels` (-1 for unlabelled clips)."""
    return self.labels.index(label) if label else -1

  def read(self, clip_id: str, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Frames [start, stop) of one clip as float32 [frames, n_mels]."""
    return self.read_many([(clip_id, start, stop)])[0]

  def read_many(self, requests: Iterable[tuple[str, int, int | None]]) -> list[np.ndarray]:
    """Many slices at once; tensorstore runs the reads concurrently."""
    futures = []
    for clip_id, start, stop in requests:
      c = self.clip(clip_id)
      stop = c.num_frames if stop is None else stop
      if not 0 <= start <= stop <= c.num_frames:
        raise IndexError(f'Frames [{start}, {stop}) are outside clip {clip_id!r}, which has {c.num_frames} frames.')
      futures.append(self._array[c.frame_offset + start:c.frame_offset + stop].read())
    return [np.asarray(f.result(), dtype=np.float32) for f in futures]

  def read_stored(self, frame_offset: int, num_frames: int):
    """A tensorstore future of the store's rows [frame_offset, frame_offset + num_frames), in the stored dtype
    (for packing many clips at once; `read` is the per-clip, float32 way)."""
    return self._array[frame_offset:frame_offset + num_frames].read()

  def select(self, splits: Iterable[str] | None = None, *, exclude: Iterable[str] = ()) -> list[Clip]:
    """Clips whose split is in `splits` (all when None) and not in `exclude`."""
    splits = None if splits is None else set(splits)
    exclude = set(exclude)
    return [c for c in self.clips if (splits is None or c.split in splits) and c.split not in exclude]

  def train_splits(self, fold: int | None = None) -> list[str]:
    """The splits that form the training part (see `training_splits`)."""
    return training_splits({c.split for c in self.clips}, fold)

  def test_splits(self, fold: int | None = None) -> list[str]:
    """The splits that form the test part: fold<k> of the DCASE development set, else 'test' or 'eval'."""
    present = sorted({c.split for c in self.clips})
    if any(s.startswith('fold') for s in present):
      if fold is None:
        raise ValueError('This is a DCASE development set: name the fold (1-4) whose evaluate list is the test part.')
      return [f'fold{fold}']
    return [s for s in present if s in ('test', 'eval')]

  def folds(self) -> list[int]:
    return sorted({int(c.split[4:]) for c in self.clips if c.split.startswith('fold')})

  def norm_stats(self, splits: Iterable[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-band mean and std (float32 [n_mels] each) over the frames of the given splits (default: training part)."""
    splits = self.train_splits() if splits is None else list(splits)
    sums = self.info['band_sums']
    count, total, total_sq = 0.0, np.zeros(self.n_mels), np.zeros(self.n_mels)
    for s in splits:
      if s in sums:
        count += sums[s]['count']
        total += np.asarray(sums[s]['sum'])
        total_sq += np.asarray(sums[s]['sum_sq'])
    if not (np.all(np.isfinite(total)) and np.all(np.isfinite(total_sq))):
      raise FeaturesError(f'The band sums of {self.root} ({INFO_NAME}, splits {sorted(splits)}) are not finite; the '
                          'store holds non-finite frames. Preprocess the data again into a new folder.')
    mean, std = stats_from_sums(count, total, total_sq)
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std))):
      raise FeaturesError(f'The normalisation statistics of {self.root} are not finite; preprocess the data again '
                          'into a new folder.')
    return mean, std


def open_features(root: str, **kwargs) -> Features:
  return Features(root, **kwargs)


def store_files(root: str) -> dict[str, int]:
  """{path under ARRAY_NAME: size in bytes} of every file of a finished store's array, as finalize records it."""
  array = os.path.join(root, ARRAY_NAME)
  files = {}
  for folder, _, names in os.walk(array):
    for name in names:
      path = os.path.join(folder, name)
      files[os.path.relpath(path, array)] = os.path.getsize(path)
  return dict(sorted(files.items()))


def check_store_files(root: str, recorded: dict[str, int] | None) -> None:
  """Refuses a store whose array lost a file or holds a short one: tensorstore would read a missing shard as the
  fill value (zeros), silently. One stat per file, so it stays cheap at any store size; stores finalized before the
  record existed are opened as they are."""
  if recorded is None:
    return
  array = os.path.join(root, ARRAY_NAME)
  for rel, size in recorded.items():
    path = os.path.join(array, rel)
    try:
      found = os.path.getsize(path)
    except OSError:
      found = None
    if found != size:
      state = 'is missing' if found is None else f'holds {found} bytes, {size} were written'
      raise FeaturesError(f'{path} {state}: the feature store {root} is not whole. If it was copied, copy it again '
                          '(all of it); otherwise preprocess again into a new --output_dir.')

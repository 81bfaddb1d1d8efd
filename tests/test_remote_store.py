"""A feature store read by URL through tensorstore's kvstore: a real HTTP server on 127.0.0.1 serving the test store."""

import functools
import http.server
import os
import re
import shutil
import threading
import time

import numpy as np
import pytest

from dem_jax.features import FeaturesError, open_features


class RangeHandler(http.server.SimpleHTTPRequestHandler):
  """Python's file server with byte ranges, as real servers have them (tensorstore reads a shard's index by range)."""

  def log_message(self, *args):
    pass

  def send_head(self):
    match = re.fullmatch(r'bytes=(\d*)-(\d*)', self.headers.get('Range', ''))
    path = self.translate_path(self.path)
    self._remaining = None
    if not match or not os.path.isfile(path):
      return super().send_head()
    size = os.path.getsize(path)
    first, last = match.groups()
    start, stop = (int(first), min(int(last) + 1 if last else size, size)) if first else (max(size - int(last), 0),
                                                                                            size)
    f = open(path, 'rb')
    f.seek(start)
    self.send_response(206)
    self.send_header('Content-Type', 'application/octet-stream')
    self.send_header('Content-Range', f'bytes {start}-{stop - 1}/{size}')
    self.send_header('Content-Length', str(stop - start))
    self.end_headers()
    self._remaining = stop - start
    return f

  def copyfile(self, source, outputfile):
    if self._remaining is None:
      return super().copyfile(source, outputfile)
    outputfile.write(source.read(self._remaining))


@pytest.fixture(scope='module')
def served(dcase_features, tmp_path_factory):
  """(URL, local copy) of the test store, served over HTTP from a copy the tests may damage."""
  root = str(tmp_path_factory.mktemp('served') / 'store')
  shutil.copytree(dcase_features, root)
  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(RangeHandler, directory=root))
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  yield f'http://127.0.0.1:{server.server_address[1]}', root
  server.shutdown()


def test_store_read_over_http_equals_the_local_store(served):
  url, root = served
  remote, local = open_features(url + '/'), open_features(root)
  assert remote.remote and remote.root == url
  assert remote.clips == local.clips and remote.info == local.info and remote.info_bytes == local.info_bytes
  ids = [c.clip_id for c in local.clips[::7]]
  for a, b in zip(remote.read_many([(i, 10, 500) for i in ids]), local.read_many([(i, 10, 500) for i in ids])):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(remote.norm_stats()[0], local.norm_stats()[0])


def test_file_url_is_the_local_store(dcase_features):
  features = open_features('file://' + dcase_features)
  assert not features.remote and features.root == dcase_features
  assert features.read(features.clips[0].clip_id).shape[0] == features.clips[0].num_frames


def test_unreachable_address_fails_quickly_naming_it_and_the_fix():
  import socket
  with socket.socket() as s:  # A port nobody listens on.
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  t0 = time.perf_counter()
  with pytest.raises(FeaturesError, match=rf'http://127.0.0.1:{port}/features.json cannot be read .*check the '
                                          'address.*GOOGLE_APPLICATION_CREDENTIALS.*AWS_'):
    open_features(f'http://127.0.0.1:{port}')
  assert time.perf_counter() - t0 < 30


def test_served_folder_without_a_store_says_what_is_missing(served):
  url, _ = served
  with pytest.raises(FeaturesError, match='features.json is missing'):
    open_features(url + '/features.zarr')


def test_preprocessing_refuses_a_url_and_writes_nothing(dcase_dir, tmp_path, monkeypatch):
  from dem_jax.configs import features as features_config
  from dem_jax.preprocess import job
  monkeypatch.chdir(tmp_path)  # A relative 'gs:' folder would land here.
  with pytest.raises(job.PreprocessError, match=r'gs://bucket/f: preprocessing writes to a local folder only'):
    job.run(features_config.get_config(), dataset='dcase2018_task5', data_dir=dcase_dir, output_dir='gs://bucket/f')
  assert os.listdir(tmp_path) == []


def test_streamed_window_read_over_http_equals_the_local_one(served):
  from dem_jax import streaming
  from dem_jax.parallel import DataParallel
  from dem_jax.sampler import TripletSampler
  url, root = served
  tiles = []
  for features in (open_features(url), open_features(root)):
    sampler = TripletSampler(features.clips, tile_frames=48, neighbour_frames=50)
    with streaming.StreamStore(features, sampler, DataParallel('jit'), global_batch=16, steps_per_call=1,
                               steps_per_epoch=40, resident_gb=0.006, device_fraction=0.5, place='host') as store:
      tiles.append([store._loader.cut(step, 1)['distant'] for step in (0, 9)])
      read = store.reader.bytes_read
  for a, b in zip(*tiles):
    np.testing.assert_array_equal(a, b)
  assert read > 0

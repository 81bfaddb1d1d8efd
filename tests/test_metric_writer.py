"""MetricWriter: a resumed run reads as one run (metrics.jsonl and TensorBoard), hparams, figures, projector; and the
progress lines of long jobs."""

import glob
import json
import logging
import os
import struct

import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from dem_jax import log_util
from dem_jax import plots
from dem_jax.metric_writer import MetricWriter, read_metrics


def read_events(workdir):
  """Every event of WORKDIR/tensorboard's event files (TFRecord: length, its CRC, the record, its CRC)."""
  events = []
  for path in sorted(glob.glob(os.path.join(workdir, 'tensorboard', 'events.out.tfevents.*'))):
    with open(path, 'rb') as f:
      data = f.read()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack('<Q', data[offset:offset + 8])
      events.append(event_pb2.Event.FromString(data[offset + 12:offset + 12 + length]))
      offset += 12 + length + 4
  return events


def write_steps(workdir, steps, **kwargs):
  writer = MetricWriter(str(workdir), **kwargs)
  for step in steps:
    writer.write(step, {'loss': 1.0 / step}, prefix='train/')
  writer.close()


def test_resume_drops_the_killed_runs_later_steps(tmp_path):
  write_steps(tmp_path, range(1, 11))
  write_steps(tmp_path, range(6, 9), purge_step=5)  # resumed from the checkpoint of step 5
  assert [r['step'] for r in read_metrics(str(tmp_path))] == [1, 2, 3, 4, 5, 6, 7, 8]
  # TensorBoard drops the earlier run's events from the first step the resumed run writes.
  starts = [e for e in read_events(tmp_path) if e.HasField('session_log')]
  assert [(e.session_log.status, e.step) for e in starts] == [(event_pb2.SessionLog.START, 6)]


def test_a_half_written_last_line_is_dropped_and_the_rest_kept(tmp_path):
  write_steps(tmp_path, [1, 2, 3], tensorboard=False)
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 4, "train/lo')  # killed mid-write
  assert [r['step'] for r in read_metrics(str(tmp_path))] == [1, 2, 3]
  write_steps(tmp_path, [4], tensorboard=False, purge_step=3)
  with open(tmp_path / 'metrics.jsonl') as f:
    assert [json.loads(line)['step'] for line in f] == [1, 2, 3, 4]


def test_a_damaged_line_inside_the_file_is_an_error_naming_it(tmp_path):
  (tmp_path / 'metrics.jsonl').write_text('{"step": 1}\nnot json\n{"step": 3}\n')
  with pytest.raises(ValueError, match=r'metrics.jsonl, line 2, is not JSON'):
    MetricWriter(str(tmp_path), tensorboard=False, purge_step=3)


def test_a_reader_writing_to_tensorboard_leaves_metrics_jsonl_alone(tmp_path):
  (tmp_path / 'metrics.jsonl').write_text('{"step": 1}\n{"step": 2, "half')
  writer = MetricWriter(str(tmp_path), jsonl=False)
  writer.write(3, {'x': 1.0})
  writer.close()
  assert (tmp_path / 'metrics.jsonl').read_text() == '{"step": 1}\n{"step": 2, "half'


def test_hparams_figures_and_projector_export(tmp_path):
  writer = MetricWriter(str(tmp_path))
  writer.write_hparams({'optimizer': {'learning_rate': 0.001}, 'model': {'name': 'resnet18'}, 'batch_size': 64},
                       metrics={'eval/loss': 0.0})
  figure = plots.plot_confusion_matrix(np.eye(2), ['a', 'b'])
  writer.write_figures(20, {'eval/confusion_matrix': figure})
  writer.write_embedding(20, np.eye(3, 4), ['a', 'b', 'a'], tag='eval/held_out_tiles')
  writer.write_embedding(20, np.eye(2, 4), ['b', 'b'], tag='eval/held_out_tiles')  # the step evaluated again
  writer.close()
  events = read_events(tmp_path)
  summaries = [v for e in events for v in e.summary.value]
  plugins = {v.metadata.plugin_data.plugin_name for v in summaries}
  assert 'hparams' in plugins
  hparams = b''.join(v.metadata.plugin_data.content for v in summaries
                     if v.metadata.plugin_data.plugin_name == 'hparams')
  assert b'optimizer.learning_rate' in hparams and b'model.name' in hparams and b'eval/loss' in hparams
  (image,) = [(e.step, v) for e in events for v in e.summary.value if v.tag == 'eval/confusion_matrix']
  assert image[0] == 20 and image[1].image.encoded_image_string.startswith(b'\x89PNG')
  (metadata,) = glob.glob(str(tmp_path / 'tensorboard' / '00020' / '*' / 'metadata.tsv'))
  assert open(metadata).read().split() == ['b', 'b']


def test_progress_logs_every_interval_when_not_on_a_terminal(caplog, monkeypatch):
  clock = iter([0.0, 10.0, 31.0, 40.0, 62.0, 70.0])  # the start, then one reading per update
  monkeypatch.setattr(log_util.time, 'monotonic', lambda: next(clock))
  progress = log_util.Progress('embed', total=5, unit='file', interactive=False)
  with caplog.at_level(logging.INFO):
    for _ in range(5):
      progress.update(note='x.wav')
  progress.close()
  lines = [r.getMessage() for r in caplog.records]
  # 31 s and 62 s are 30 s or more past the previous line; the last item always logs.
  assert [line.split(',')[0] for line in lines] == ['embed: 2/5 files', 'embed: 4/5 files', 'embed: 5/5 files']
  assert lines[-1].endswith('(x.wav)')

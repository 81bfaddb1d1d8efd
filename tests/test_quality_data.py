"""The quality benchmark's set builder and the benchmark's own arithmetic, on small made-up material.

The packaged tunes and SoundFont are not needed: the builder takes the tunes, their events and the renderer as
arguments, and these tests pass small stand-ins (the layout, split and caching are what is tested).
"""

import json
import os

import numpy as np
import pytest
import soundfile

from dem_jax import datasets
from dem_jax.benchmarks import quality
from dem_jax.benchmarks import quality_data as qd

TUNES = {f'tune{i}': f'/nowhere/tune{i}.mid' for i in range(5)}


def events_of(path):
  """A tune of 30 notes, one every 0.5 s, then (for tune0) a long pause with two notes: its second excerpt is thin."""
  notes = [(0.5 * k, 'note_on', 0, 60 + k % 12, 90) for k in range(30)]
  if path.endswith('tune0.mid'):
    notes += [(40.0, 'note_on', 0, 60, 90), (50.0, 'note_on', 0, 62, 90)]
  return notes


class CountingRenderer:
  """A stand-in for the SoundFont: a tone whose pitch and level follow the program (level must not matter)."""

  def __init__(self):
    self.calls = 0

  def __call__(self, events, program, start, seconds):
    self.calls += 1
    t = np.arange(int(seconds * qd.SAMPLE_RATE)) / qd.SAMPLE_RATE
    return (0.01 * (1 + program % 5)) * np.sin(2 * np.pi * (100 + 5 * program) * t)


def small_config(**changes):
  return qd.settings() | {'item_seconds': 2.0, 'windows': [0.1, 0.6], 'min_notes': 3} | changes


def test_excerpt_starts_follow_the_tune_length_and_skip_thin_windows():
  # Last onset 14.5 s: windows at 0.1 and 0.6 start at 1.45 and 8.7 s; 2-s excerpts hold 4 notes each.
  assert qd.excerpt_starts(events_of('tune1.mid'), 2.0, (0.1, 0.6), 3) == [1.45, 8.7]
  # tune0 ends at 50 s: the 0.6 window (30 s) holds no note and is left out.
  assert qd.excerpt_starts(events_of('tune0.mid'), 2.0, (0.1, 0.6), 3) == [5.0]
  assert qd.excerpt_starts([], 2.0, (0.1,), 1) == []


def test_build_writes_class_folders_and_a_split_by_tune(tmp_path):
  render = CountingRenderer()
  built = qd.build(str(tmp_path), tunes=TUNES, read_events=events_of, render=render, config=small_config(),
                   log=lambda _: None)
  excerpts = 1 + 2 * 4  # tune0 has one excerpt, the others two
  assert built['files'] == render.calls == excerpts * len(qd.FAMILIES)
  dataset = datasets.read_folder(str(tmp_path / 'audio'), split_file=str(tmp_path / 'split.csv'))
  assert not dataset.problems
  assert dataset.labels == sorted(qd.FAMILIES)
  assert len(dataset.clips) == built['files']
  # Grouped by tune: no tune on both sides, and every family holds the same tunes on each side.
  split_of_group = {}
  for clip in dataset.clips:
    assert split_of_group.setdefault(clip.group, clip.split) == clip.split
  test = {g for g, s in split_of_group.items() if s == 'test'}
  assert test == set(built['test_tunes']) and len(test) == round(qd.TEST_FRACTION * len(TUNES))
  for family in qd.FAMILIES:
    assert {c.group for c in dataset.clips if c.label == family and c.split == 'test'} == test
  # Fixed loudness whatever the program's level, 16 kHz, the excerpt's length.
  audio, rate = soundfile.read(tmp_path / 'audio' / 'brass' / 'tune1_0.wav')
  assert rate == qd.SAMPLE_RATE and audio.shape == (2 * qd.SAMPLE_RATE,)
  assert np.sqrt(np.mean(audio ** 2)) == pytest.approx(qd.TARGET_RMS, rel=1e-3)
  # Programs come from the family, as recorded in the split file's extra column.
  programs = {c.label: int(dict(c.extra)['program']) for c in dataset.clips}
  assert all(programs[f] in qd.FAMILIES[f] for f in qd.FAMILIES)


def test_build_is_cached_and_rebuilt_when_settings_change(tmp_path):
  render = CountingRenderer()
  first = qd.build(str(tmp_path), tunes=TUNES, read_events=events_of, render=render, config=small_config(),
                   log=lambda _: None)
  calls = render.calls
  assert qd.build(str(tmp_path), tunes=TUNES, read_events=events_of, render=render, config=small_config(),
                  log=lambda _: None) == first
  assert render.calls == calls  # nothing rendered again
  # Longer excerpts: the same excerpts, rendered again at the new length; files of the old set go.
  (tmp_path / 'audio' / 'piano' / 'stale.wav').write_bytes(b'')
  second = qd.build(str(tmp_path), tunes=TUNES, read_events=events_of, render=render, config=small_config(
      item_seconds=3.0), log=lambda _: None)
  assert render.calls == calls + second['files']
  assert not (tmp_path / 'audio' / 'piano' / 'stale.wav').exists()
  assert soundfile.info(str(tmp_path / 'audio' / 'piano' / 'tune1_0.wav')).duration == pytest.approx(3.0)
  assert json.loads((tmp_path / 'build.json').read_text())['settings']['item_seconds'] == 3.0


def test_program_choice_is_a_fixed_member_of_the_family():
  assert qd.program_for('tune1', 0, 'strings') == qd.program_for('tune1', 0, 'strings')
  chosen = {qd.program_for(f'tune{i}', w, 'woodwind') for i in range(20) for w in range(2)}
  assert chosen <= set(qd.FAMILIES['woodwind']) and len(chosen) > 1  # a family, not one preset


def test_silent_excerpt_is_an_error():
  with pytest.raises(qd.QualityDataError, match='silence'):
    qd.at_loudness(np.zeros(100, np.float32))


def test_missing_packages_name_the_install_command(tmp_path):
  missing = qd.Package('no-such-package', str(tmp_path / 'absent' / '*.mid'))
  with pytest.raises(qd.QualityDataError, match='apt-get install no-such-package'):
    qd.ensure_material(install=False, packages=[missing])


def test_installing_missing_material_says_so_before_it_runs(monkeypatch, capsys):
  missing = qd.Package('fluid-soundfont-gm-none', '/nonexistent/*.sf2')
  calls = []
  monkeypatch.setattr(qd.os, 'geteuid', lambda: 0)
  monkeypatch.setattr(qd.subprocess, 'run', lambda cmd, **kw: calls.append((cmd, capsys.readouterr().err)))
  with pytest.raises(qd.QualityDataError):
    qd.ensure_material(install=True, packages=[missing])
  (update, first_err), (install, _) = calls
  assert install[:2] == ['apt-get', 'install'] and 'fluid-soundfont-gm-none' in install
  assert 'installing the Debian packages fluid-soundfont-gm-none (apt-get install, as root)' in first_err


def test_tune_paths_names_tunes_by_package(tmp_path):
  for name in ('b.mid', 'a.mid', 'notes.txt'):
    (tmp_path / name).write_bytes(b'')
  tunes = qd.tune_paths([qd.Package('pkg', str(tmp_path / '*.mid'))])
  assert list(tunes) == ['pkg-a', 'pkg-b']


def test_midi_events_in_seconds_without_drums(tmp_path):
  mido = pytest.importorskip('mido')  # Needed only to build the set; not a dependency of dem_jax.
  track = mido.MidiTrack([
      mido.MetaMessage('set_tempo', tempo=500000, time=0),  # 120 bpm: 480 ticks = 0.5 s
      mido.Message('program_change', channel=0, program=30, time=0),
      mido.Message('note_on', channel=0, note=60, velocity=80, time=480),
      mido.Message('note_on', channel=9, note=36, velocity=100, time=0),  # drums: dropped
      mido.MetaMessage('set_tempo', tempo=1000000, time=0),  # 60 bpm: 480 ticks = 1 s
      mido.Message('note_off', channel=0, note=60, velocity=0, time=480),
  ])
  path = str(tmp_path / 'tune.mid')
  mido.MidiFile(tracks=[track], ticks_per_beat=480).save(path)
  assert qd.midi_events(path) == [(0.5, 'note_on', 0, 60, 80), (1.5, 'note_off', 0, 60, 0)]


def test_quality_summary_reads_every_representation_and_baseline():
  fig = lambda f1, nmi: {'linear_probe': {'macro_f1_tile': f1, 'macro_f1_clip': f1 + 0.1}, 'kmeans': {'nmi': nmi},
                         'retrieval': {'k': 5, 'precision_at_k': 0.5}}
  report = {'model': fig(0.8, 0.4), 'model_trunk': fig(0.7, 0.3), 'checkpoint_step': 10,
            'baselines': {'logmel_stats': fig(0.6, 0.2), 'random_init': fig(0.5, 0.1)}}
  rows = quality.summary(report)
  assert list(rows) == ['model', 'model_trunk', 'logmel_stats', 'random_init']
  assert rows['model'] == {'tile_f1': 0.8, 'clip_f1': pytest.approx(0.9), 'nmi': 0.4, 'p_at_5': 0.5}
  assert '| model | 80.0 | 90.0 | 40.0 | 50.0 |' in quality.format_table(rows)


def test_budget_from_the_calibration_rate():
  # Cumulative rates 1.0 at step 20 (20 s) and 1.5 at step 50 (33.3 s): 30 steps in 13.3 s = 2.25 steps/s.
  metrics = [{'step': 20, 'train/steps_per_s': 1.0}, {'step': 30, 'eval/loss': 1.0},
             {'step': 50, 'train/steps_per_s': 1.5}]
  rate = quality.steps_per_second(metrics, 20, 50)
  assert rate == pytest.approx(2.25)
  assert quality.budget_steps(rate, 2.0) == 270
  with pytest.raises(quality.QualityBenchError, match='too short'):
    quality.budget_steps(rate, 0.001)
  with pytest.raises(quality.QualityBenchError, match='did not log'):
    quality.steps_per_second(metrics, 20, 40)


def test_flags_pass_config_settings_on_and_reject_the_rest():
  flags, overrides = quality.parse_flags(['--minutes=2', '--config.loss.name=infonce'])
  assert flags.minutes == 2.0 and overrides == ['--config.loss.name=infonce']
  with pytest.raises(SystemExit):
    quality.parse_flags(['--minutse=2'])
  with pytest.raises(SystemExit):
    quality.parse_flags(['--minutes=0'])


def test_config_budget_detection_reads_the_config_file():
  # The music config of this repository: train_minutes is used when the config defines it, as the trainer would.
  from dem_jax.configs import music
  assert quality.config_has_train_minutes('configs/music.py:cpu') == ('train_minutes' in music.get_config('cpu'))
  with pytest.raises(quality.QualityBenchError, match='not a Python config'):
    quality.config_has_train_minutes('configs/nothing.py')


def test_training_commands_calibrate_then_run_the_steps_that_fit(tmp_path, monkeypatch):
  commands = []

  def fake_run(cmd, what):
    commands.append(cmd)
    workdir = next(a.split('=', 1)[1] for a in cmd if a.startswith('--workdir='))
    os.makedirs(workdir, exist_ok=True)
    # The calibration run logs cumulative rates of 1 step/s at step 20 and 2 steps/s at step 90 (70 steps in 25 s).
    rates = {20: 1.0, 90: 2.0, 100: 2.0} if workdir.endswith('calibration') else {7: 1.0}
    with open(os.path.join(workdir, 'metrics.jsonl'), 'w', encoding='utf-8') as f:
      f.writelines(json.dumps({'step': s, 'train/steps_per_s': r}) + '\n' for s, r in rates.items())

  monkeypatch.setattr(quality, '_run', fake_run)
  monkeypatch.setattr(quality, 'config_has_train_minutes', lambda _: False)
  flags, overrides = quality.parse_flags(['--minutes=1', '--config.loss.name=infonce', '--config.num_steps=5'])
  quality.train(flags, overrides[:1], 'F', str(tmp_path / 'run'))
  calibration, main = commands
  # The user's settings reach both runs; the calibration's own come last, so they win over a user's num_steps.
  assert '--config.loss.name=infonce' in calibration and calibration[-4:][0] == '--config.num_steps=100'
  assert '--config.num_steps=168' in main and '--config.eval_every=168' in main  # 2.8 steps/s x 60 s
  # A budget given in steps skips the calibration.
  commands.clear()
  run = quality.train(flags, overrides, 'F', str(tmp_path / 'run2'))
  assert len(commands) == 1 and commands[0][-1] == '--config.num_steps=5'
  assert run['budget'] == 'num_steps given' and run['steps'] == 7
  # A config with a time budget gets --minutes as its budget and keeps its own length (no step setting passed).
  monkeypatch.setattr(quality, 'config_has_train_minutes', lambda _: True)
  commands.clear()
  run = quality.train(flags, overrides[:1], 'F', str(tmp_path / 'run3'))
  assert len(commands) == 1 and '--config.train_minutes=1.0' in commands[0]
  assert not [a for a in commands[0] if a.startswith(('--config.num_steps=', '--config.num_epochs='))]
  assert run['budget'] == 'config.train_minutes'


@pytest.mark.parametrize('dataset', ['music', 'dcase'])
def test_cpu_recipe_is_a_budgeted_run_and_tiny_stays_a_smoke_run(dataset):
  import importlib
  module = importlib.import_module(f'dem_jax.configs.{dataset}')
  cpu, tiny, default = module.get_config('cpu'), module.get_config('tiny'), module.get_config()
  # A :cpu run ends after 30 passes over the training tiles or when the budget is spent, whichever comes first, and
  # the learning rate's cosine follows the steps the run will reach.
  assert cpu.train_minutes > 0 and cpu.num_steps == 0 and cpu.num_epochs == 30
  assert cpu.optimizer.schedule == 'cosine' and not cpu.optimizer.schedule_steps
  assert tiny.train_minutes == 0 and tiny.num_steps <= 1000
  # The dataset's own sampling rules hold in every variant; the original's settings stay the default.
  for config in (cpu, tiny):
    assert config.data.cross_clip_neighbours == default.data.cross_clip_neighbours
  assert (default.loss.name, default.optimizer.schedule, default.model.width) == ('triplet', 'staircase', 1.0)
  with pytest.raises(ValueError, match=':cpu'):
    module.get_config('fast')


@pytest.mark.filterwarnings('ignore:Number of distinct clusters')  # 2 distinct points, 6 clusters asked for
def test_cluster_figures_score_the_clusters_against_family_program_and_tune_over_seeds(tmp_path, monkeypatch):
  qd.build(str(tmp_path / 'data'), tunes=TUNES, read_events=events_of, render=CountingRenderer(),
           config=small_config(), log=lambda _: None)
  from dem_jax.configs import features as features_config
  from dem_jax import embed
  from dem_jax.features import open_features
  from dem_jax.preprocess import job
  features_dir = str(tmp_path / 'features')
  job.run(features_config.get_config(), dataset='folder', data_dir=str(tmp_path / 'data' / 'audio'),
          output_dir=features_dir, split_file=str(tmp_path / 'data' / 'split.csv'))
  features = open_features(features_dir)

  class PointEmbedder:
    """Tiles that share a key (the tune, or the family) share one point far from the others': any clustering with
    as many clusters as keys then follows the key."""
    key = None

    def __init__(self, workdir):
      assert workdir == 'W'

    def embed_features(self, features, clips, trunk):
      assert trunk and {c.split for c in clips} == {'test'}
      keys = sorted({self.key(c) for c in clips})
      clip_index = np.repeat(np.arange(len(clips)), 3)
      points = 10.0 * np.eye(8)[[keys.index(self.key(c)) for c in clips]][clip_index]
      return {'clips': clips, 'clip_index': clip_index, 'embeddings': points, 'trunk': points}

  monkeypatch.setattr(embed, 'Embedder', PointEmbedder)
  PointEmbedder.key = staticmethod(lambda clip: clip.group)
  follow, spread = quality.cluster_figures('W', features_dir, spread_seeds=3)
  # The 2 test tunes fall in separate clusters, each holding every family and program, so the clusters say all
  # about the tune and nothing about the family or the program, whatever the k-Means seed.
  test_tunes = {c.group for c in features.clips if c.split == 'test'}
  assert len(test_tunes) == 2
  for name in ('model', 'model_trunk'):
    assert set(follow[name]) == {'family', 'program', 'tune'}
    assert follow[name]['tune'] == pytest.approx(1.0) and follow[name]['family'] == pytest.approx(0.0, abs=1e-9)
    assert follow[name]['program'] < 0.5
    assert set(spread[name]) == {'min', 'median', 'max'}
    assert spread[name]['max'] == pytest.approx(0.0, abs=1e-9)
  # Points by family: every seed's clusters are the families.
  PointEmbedder.key = staticmethod(lambda clip: clip.label)
  follow, spread = quality.cluster_figures('W', features_dir, spread_seeds=3)
  for name in ('model', 'model_trunk'):
    assert follow[name]['family'] == pytest.approx(1.0)
    assert spread[name]['min'] == pytest.approx(1.0) and spread[name]['median'] == pytest.approx(1.0)


def fake_stages(monkeypatch, tmp_path, train, report_of_seed, clusters):
  """`bench quality` with its stages faked: the data set, training (`train`), the evaluation CLI (writes
  report_of_seed(seed) as the report of WORKDIR/seed_N) and the clustering (`clusters`)."""

  def evaluate(cmd, what):
    workdir = next(a.split('=', 1)[1] for a in cmd if a.startswith('--workdir='))
    os.makedirs(os.path.join(workdir, 'eval'))
    with open(os.path.join(workdir, 'eval', 'report.json'), 'w', encoding='utf-8') as f:
      json.dump(report_of_seed(int(workdir.rsplit('_', 1)[1])), f)

  monkeypatch.setattr(quality, 'prepare', lambda *a, **k: (
      {'files': 1, 'tunes': 1, 'audio_seconds': 60, 'labels': ['a']}, str(tmp_path / 'features')))
  monkeypatch.setattr(quality, 'train', train)
  monkeypatch.setattr(quality, '_run', evaluate)
  monkeypatch.setattr(quality, 'cluster_figures', clusters)


def report_figures(f1: float) -> dict:
  return {'linear_probe': {'macro_f1_tile': f1, 'macro_f1_clip': 1.0}, 'kmeans': {'nmi': 0.5},
          'retrieval': {'k': 5, 'precision_at_k': 0.5}}


def test_seeds_train_one_run_each_then_summarise_and_a_restart_keeps_the_finished_runs(tmp_path, monkeypatch, capsys):
  """`--seeds=0,1,2`: a run per seed in WORKDIR/seed_N with --config.seed=N, each figure's mean, sd, min and max
  over the runs; started again, the finished runs are read back, an interrupted one is trained again."""
  trained = []

  def fake_train(flags, overrides, features_dir, workdir):
    os.makedirs(os.path.join(workdir, 'checkpoints'))
    trained.append(overrides)
    return {'budget': 'config.train_minutes', 'steps': 10, 'train_wall_seconds': 1.0, 'calibration_steps_per_s': None}

  def fake_clusters(workdir, features_dir):
    seed = int(workdir.rsplit('_', 1)[1])
    spread = {'min': 0.4, 'median': 0.5 + 0.01 * seed, 'max': 0.6}
    return {'model': {'family': 0.5}}, {'model': spread, 'model_trunk': spread}

  fake_stages(monkeypatch, tmp_path, fake_train, lambda seed: {
      'model': report_figures(0.8 + 0.05 * seed), 'model_trunk': report_figures(0.9),
      'baselines': {'logmel_stats': report_figures(0.6)}}, fake_clusters)
  argv = ['--seeds=0,1,2', f'--workdir={tmp_path / "runs"}', '--config.loss.name=infonce']
  quality.main(argv)
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert trained == [['--config.loss.name=infonce', f'--config.seed={s}'] for s in (0, 1, 2)]
  assert out['seeds'] == [0, 1, 2] and sorted(out['runs']) == ['0', '1', '2']
  tile = out['over_seeds']['model']['tile_f1']
  assert tile['mean'] == pytest.approx(0.85) and tile['sd'] == pytest.approx(0.05)
  assert (tile['min'], tile['max']) == (pytest.approx(0.8), pytest.approx(0.9))
  assert out['over_seeds']['model_trunk']['nmi_median']['mean'] == pytest.approx(0.51)
  assert out['over_seeds']['logmel_stats']['tile_f1']['sd'] == 0
  # Started again after seed 1 was interrupted (no figures): 0 and 2 are read back, 1 is trained again.
  os.remove(tmp_path / 'runs' / 'seed_1' / 'quality.json')
  trained.clear()
  quality.main(argv)
  printed = capsys.readouterr().out
  assert trained == [['--config.loss.name=infonce', '--config.seed=1']]
  assert 'seed 1:' in printed and 'did not finish' in printed
  assert json.loads(printed.strip().splitlines()[-1])['over_seeds'] == out['over_seeds']
  # A seed directory holding files no run writes is not removed.
  (tmp_path / 'runs' / 'seed_2' / 'quality.json').rename(tmp_path / 'runs' / 'seed_2' / 'notes.txt')
  with pytest.raises(SystemExit, match=r"notes\.txt"):
    quality.main(argv)
  assert (tmp_path / 'runs' / 'seed_2' / 'notes.txt').exists()
  # The same workdir with other settings is refused rather than mixed in.
  for other in (['--config.loss.name=triplet'], ['--config.loss.name=infonce', '--minutes=5']):
    with pytest.raises(SystemExit, match='holds a run with the settings'):
      quality.main(['--seeds=0,1', f'--workdir={tmp_path / "runs"}'] + other)


def test_seeds_share_the_first_seeds_calibrated_steps(tmp_path, monkeypatch, capsys):
  """Without a time budget in the config, only the first seed is calibrated; the others train for its steps."""
  trained = []

  def fake_train(flags, overrides, features_dir, workdir):
    os.makedirs(os.path.join(workdir, 'checkpoints'))
    trained.append(overrides)
    given = [o for o in overrides if o.startswith('--config.num_steps=')]
    if given:
      return {'budget': 'num_steps given', 'steps': int(given[0].split('=')[1]), 'train_wall_seconds': 1.0,
              'calibration_steps_per_s': None}
    return {'budget': 'num_steps from a calibration run', 'steps': 123, 'train_wall_seconds': 1.0,
            'calibration_steps_per_s': 2.0}

  fake_stages(monkeypatch, tmp_path, fake_train, lambda seed: {'model': report_figures(0.5)},
              lambda *a: ({}, {'model': {'min': 0.5, 'median': 0.5, 'max': 0.5}}))
  argv = ['--seeds=3,1,2', f'--workdir={tmp_path / "runs"}']
  quality.main(argv)
  assert trained == [['--config.seed=3'], ['--config.num_steps=123', '--config.seed=1'],
                     ['--config.num_steps=123', '--config.seed=2']]
  steps = [r['steps'] for r in json.loads(capsys.readouterr().out.strip().splitlines()[-1])['runs'].values()]
  assert steps == [123, 123, 123]
  # Started again, the finished runs are recognised with the steps they were given.
  os.remove(tmp_path / 'runs' / 'seed_2' / 'quality.json')
  trained.clear()
  quality.main(argv)
  assert trained == [['--config.num_steps=123', '--config.seed=2']]


@pytest.mark.parametrize('argv', [['--seeds=0,x'], ['--seeds=1,1'], ['--seeds=3'], ['--seeds=0,-1'],
                                  ['--seeds=0,1', '--config.seed=4']])
def test_bad_seed_lists_are_refused(argv, capsys):
  with pytest.raises(SystemExit):
    quality.parse_flags(argv)
  assert '--seeds' in capsys.readouterr().err

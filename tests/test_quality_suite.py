"""The quality suite: its speech and everyday-sounds builders, the HEAR export, skipping and the JSON it prints.

The packaged voices, fortunes and sound archive are not needed: the builders take their material and renderer as
arguments, and these tests pass small stand-ins (the layout and the splits are what is tested); training and
evaluation are stubbed, as in test_quality_data.py.
"""

import csv
import json
import os

import numpy as np
import pytest
import soundfile

from dem_jax import datasets
from dem_jax.benchmarks import hear_export
from dem_jax.benchmarks import quality
from dem_jax.benchmarks import quality_data as qd
from dem_jax.benchmarks import quality_sounds as qs
from dem_jax.benchmarks import quality_speech as qp
from dem_jax.benchmarks import quality_suite as suite

RATE = 16000
WORDS = ('apple', 'river', 'stone', 'cloud', 'table', 'garden', 'window', 'candle', 'forest', 'silver', 'harbor',
         'meadow')


def fortune(i: int) -> str:
  """A prose passage of about 200 letters whose sentences no other passage holds (the number is spelled out)."""
  name = ' '.join(WORDS[int(d)] for d in f'{i:03d}')
  return (f'The {name} story begins here and it goes on for a while. Nobody knows how the {name} story ends. '
          f'It is said that the {name} story was told by many people.')


class ToneRenderer:
  """A stand-in for festival: a tone whose pitch is the voice's, 3 s long, whatever the text."""

  def __call__(self, text, voice):
    t = np.arange(3 * RATE) / RATE
    return 0.1 * np.sin(2 * np.pi * (100 + 20 * qp.VOICES.index(voice)) * t)


def small_speech_config(**changes):
  return qp.settings() | {'passages_per_language': 5, 'item_seconds': 2.0} | changes


def build_speech(root, **kw):
  texts = {'en': [fortune(i) for i in range(8)] + [fortune(0)], 'cs': [fortune(i) for i in range(100, 108)],
           'it': [fortune(i) for i in range(200, 208)]}
  return qp.build(str(root), texts=texts, render=ToneRenderer(), config=small_speech_config(), log=lambda _: None,
                  **kw)


def test_passages_never_share_a_sentence_and_skip_what_is_not_prose():
  shared = 'Nobody knows how it ends.'
  not_prose = ['|--+--| 12:30 ' * 15, 'žluťoučký kůň ' * 15, 'Too short.']  # art, not the voice's letters, short
  texts = [fortune(1), fortune(2) + ' ' + shared, fortune(3) + ' ' + shared] + not_prose
  chosen = qp.choose_passages(texts, 10, 'ascii')
  keys = [k for text in chosen for k in {qp.sentence_key(s) for s in qp.sentences(text)}]
  assert len(keys) == len(set(keys))  # no sentence in two passages
  assert fortune(1) in chosen and sum(shared in t for t in chosen) == 1
  assert not set(not_prose) & set(chosen)
  assert qp.choose_passages(['žluťoučký kůň ' * 15], 1, 'iso-8859-2')  # Czech letters are the Czech voices'
  # Marks that crash festival's tokenizer are not spoken.
  assert qp.speakable('"Hi..." -- Bo (x).') == 'Hi. Bo x.'
  # Case and punctuation do not make a sentence another one.
  assert qp.sentence_key('It ends, HERE!') == qp.sentence_key('it ends here.')


def test_speech_build_splits_by_passage_and_no_test_sentence_is_heard_in_training(tmp_path):
  built = build_speech(tmp_path)
  dataset = datasets.read_folder(str(tmp_path / 'audio'), split_file=str(tmp_path / 'split.csv'))
  assert not dataset.problems
  assert dataset.labels == sorted(v.label for v in qp.VOICES) == built['labels']
  assert len(dataset.clips) == built['files'] == 5 * len(qp.VOICES)
  split_of_group = {}
  for clip in dataset.clips:
    assert split_of_group.setdefault(clip.group, clip.split) == clip.split  # a passage is on one side only
  with open(tmp_path / 'passages.json', encoding='utf-8') as f:
    text_of = json.load(f)
  side_keys = {s: {qp.sentence_key(x) for g, sp in split_of_group.items() if sp == s for x in qp.sentences(text_of[g])}
               for s in ('train', 'test')}
  assert side_keys['test'] and side_keys['train'] and not side_keys['test'] & side_keys['train']
  # Every voice of a language speaks the same test passages: only the voice tells them apart.
  for voice in qp.VOICES:
    test = {c.group for c in dataset.clips if c.label == voice.label and c.split == 'test'}
    assert test == {g for g, s in split_of_group.items() if s == 'test' and g.startswith(voice.language)}
    assert len(test) == round(qp.TEST_FRACTION * 5)
  audio, rate = soundfile.read(tmp_path / 'audio' / 'cs_ph' / 'cs-001.wav')
  assert rate == RATE and len(audio) == 2 * RATE  # cut to the item length
  assert np.sqrt(np.mean(audio ** 2)) == pytest.approx(qd.TARGET_RMS, rel=1e-3)


def test_every_speech_file_is_heard_through_a_recording_chain_of_its_own():
  t = np.arange(2 * RATE) / RATE
  voice = (0.1 * np.sin(2 * np.pi * 150 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)
  first = qp.recorded(voice, 'en_kal/en-000.wav')
  assert first.dtype == np.float32 and first.shape == voice.shape and np.isfinite(first).all()
  np.testing.assert_array_equal(first, qp.recorded(voice, 'en_kal/en-000.wav'))  # the file's name draws its chain
  other = qp.recorded(voice, 'en_kal/en-001.wav')

  def band_db(x):  # level in 16 bands of 500 Hz, relative to the file's total
    power = np.abs(np.fft.rfft(x)) ** 2
    bands = np.array([b.sum() for b in np.array_split(power[:-1], 16)])
    return 10 * np.log10(bands / bands.sum() + 1e-12)

  # Another file of the same voice sounds through another microphone, room and noise.
  assert np.abs(band_db(first) - band_db(other)).max() > 6
  assert 0.3 < np.corrcoef(first, voice)[0, 1] < 0.99


def test_speech_passages_scale_with_the_minutes_asked_for():
  assert qp.passages_per_language(60) * len(qp.VOICES) * qp.ITEM_SECONDS == pytest.approx(3600, rel=0.05)
  assert qp.passages_per_language(10) < qp.passages_per_language(60)
  assert qp.passages_per_language(0.1) == 4


def test_excerpts_fill_short_sounds_and_spread_over_long_ones():
  rate = 100
  short = np.arange(30, dtype=np.float32)  # 0.3 s: played again up to 2 s
  (clip,) = qs.excerpts(short, rate, 10.0, 3, 2.0)
  assert len(clip) == 200 and np.array_equal(clip[:60], np.concatenate([short, short]))
  assert [len(c) for c in qs.excerpts(np.zeros(500, np.float32), rate, 10.0, 3, 2.0)] == [500]
  long = np.arange(4000, dtype=np.float32)  # 40 s: three 10-s excerpts, first and last at the ends
  clips = qs.excerpts(long, rate, 10.0, 3, 2.0)
  assert [len(c) for c in clips] == [1000] * 3 and clips[0][0] == 0 and clips[-1][-1] == 3999
  assert len(qs.excerpts(np.zeros(1500, np.float32), rate, 10.0, 3, 2.0)) == 1


def fake_sources():
  sources = {}
  for kind, prefixes in list(qs.KINDS.items())[:3]:
    for i in range(5):
      sources[f'{prefixes[0]}sound_{i}.ogg'] = kind
  return sources


def read_fake(name):
  """0.5-s tones for most sources, one 25-s recording (two excerpts), at 44.1 kHz as the archive's."""
  seconds = 25.0 if name.endswith('sound_4.ogg') else 0.5
  t = np.arange(int(seconds * 44100)) / 44100
  return (0.2 * np.sin(2 * np.pi * (200 + 10 * len(name)) * t)).astype(np.float32), 44100


def build_sounds(root, **changes):
  config = qs.settings() | {'item_seconds': 10.0} | changes
  return qs.build(str(root), sources=fake_sources(), read=read_fake, config=config, log=lambda _: None)


def test_sounds_build_splits_by_source_file_within_every_kind(tmp_path):
  built = build_sounds(tmp_path)
  dataset = datasets.read_folder(str(tmp_path / 'audio'), split_file=str(tmp_path / 'split.csv'))
  assert not dataset.problems
  assert dataset.labels == sorted(list(qs.KINDS)[:3]) == built['labels']
  assert len(dataset.clips) == built['files'] == 3 * (4 + 2)  # the long source gives two excerpts
  split_of_source = {}
  for clip in dataset.clips:
    assert split_of_source.setdefault(clip.group, clip.split) == clip.split
  for kind in built['labels']:
    sources = {c.group for c in dataset.clips if c.label == kind}
    test = {g for g in sources if split_of_source[g] == 'test'}
    assert len(sources) == 5 and len(test) == round(qs.TEST_FRACTION * 5)  # 2 of 5 files, none on both sides
  info = soundfile.info(str(tmp_path / 'audio' / 'animals' / 'actor-fauna-sound_0_0.wav'))
  assert (info.samplerate, info.channels, info.subtype) == (RATE, 1, 'PCM_16')
  assert info.duration == pytest.approx(qs.MIN_SECONDS)


def test_a_smaller_sounds_set_keeps_a_share_of_every_kind():
  sources = {f'a/{i}.ogg': 'a' for i in range(40)} | {f'b/{i}.ogg': 'b' for i in range(6)}
  kept = qs.files_per_kind(sources, 15.0)
  assert sum(k == 'a' for k in kept.values()) == 10 and sum(k == 'b' for k in kept.values()) == 4
  assert qs.files_per_kind(sources, 60.0) == sources


def test_missing_packages_raise_the_error_that_names_them(tmp_path):
  missing = [qd.Package('festvox-nothing', str(tmp_path / 'none')), qd.Package('0ad-none', str(tmp_path / 'zip'))]
  with pytest.raises(qd.MissingMaterialError, match='apt-get install') as e:
    qd.ensure_material(install=False, packages=missing, python_requirements={}, name='speech set')
  assert e.value.packages == ['0ad-none', 'festvox-nothing'] and 'the speech set needs' in str(e.value)


def test_hear_export_has_the_kits_format_and_keeps_groups_on_one_side(tmp_path):
  build_sounds(tmp_path / 'data')
  folder = hear_export.export_task('sounds', str(tmp_path / 'data'), str(tmp_path / 'hear'), version='v1',
                                   log=lambda _: None)
  assert os.path.basename(folder) == 'dem_jax_sounds-v1-full'
  with open(os.path.join(folder, 'task_metadata.json'), encoding='utf-8') as f:
    metadata = json.load(f)
  assert {k: metadata[k] for k in ('task_name', 'embedding_type', 'prediction_type', 'split_mode', 'splits')} == {
      'task_name': 'dem_jax_sounds', 'embedding_type': 'scene', 'prediction_type': 'multiclass',
      'split_mode': 'trainvaltest', 'splits': ['train', 'valid', 'test']}
  assert metadata['sample_duration'] is None  # 2-s and 10-s clips: the kit must not cut or pad them
  assert metadata['evaluation'] == ['top1_acc']
  with open(os.path.join(folder, 'labelvocabulary.csv'), newline='', encoding='utf-8') as f:
    vocabulary = list(csv.DictReader(f))
  labels = [r['label'] for r in vocabulary]
  assert [int(r['idx']) for r in vocabulary] == list(range(3)) and labels == sorted(list(qs.KINDS)[:3])
  with open(tmp_path / 'data' / 'split.csv', newline='', encoding='utf-8') as f:
    group_of = {hear_export.hear_name(r['file']): r['group'] for r in csv.DictReader(f)}
  side_of_group, listed = {}, 0
  for split in metadata['splits']:
    with open(os.path.join(folder, f'{split}.json'), encoding='utf-8') as f:
      labelled = json.load(f)
    audio_dir = os.path.join(folder, '16000', split)
    assert sorted(os.listdir(audio_dir)) == sorted(labelled) and labelled
    for name, label in labelled.items():
      assert len(label) == 1 and label[0] in labels and name.startswith(label[0] + '__')
      info = soundfile.info(os.path.join(audio_dir, name))
      assert (info.samplerate, info.channels, info.subtype, info.format) == (16000, 1, 'PCM_16', 'WAV')
      assert side_of_group.setdefault(group_of[name], split) == split
    listed += len(labelled)
  assert listed == len(group_of)
  # Test is the set's own test split; valid comes from the training groups only.
  with open(os.path.join(folder, 'test.json'), encoding='utf-8') as f:
    assert {group_of[n] for n in json.load(f)} == set(json.load(open(tmp_path / 'data' / 'build.json'))['test_sources'])


def test_hear_export_gives_the_clip_length_when_every_clip_has_it(tmp_path):
  build_speech(tmp_path / 'data')
  folder = hear_export.export_task('speakers', str(tmp_path / 'data'), str(tmp_path / 'hear'), version='v1',
                                   log=lambda _: None)
  with open(os.path.join(folder, 'task_metadata.json'), encoding='utf-8') as f:
    assert json.load(f)['sample_duration'] == 2.0
  # A passage, spoken by every voice of its language, is in one split only.
  side_of_passage = {}
  for split in hear_export.SPLITS:
    with open(os.path.join(folder, f'{split}.json'), encoding='utf-8') as f:
      for name in json.load(f):
        assert side_of_passage.setdefault(name.split('__')[1], split) == split
  assert set(side_of_passage.values()) == set(hear_export.SPLITS)


def report_figures(f1: float, nmi: float) -> dict:
  return {'linear_probe': {'macro_f1_tile': f1, 'macro_f1_clip': f1 + 0.05}, 'kmeans': {'nmi': nmi},
          'retrieval': {'k': 5, 'precision_at_k': 0.5}}


def fake_suite(monkeypatch, tmp_path, missing: dict[str, list[str]]):
  """The suite with its stages faked: tasks named in `missing` lack those packages; the others 'build', train and
  evaluate (figures that differ per task: tile F1 0.5 for the first task, 0.7 for the second, ...)."""
  order = list(suite.TASKS)

  def build(name):
    def run(root, minutes, install):
      if name in missing:
        raise qd.MissingMaterialError(f'the set needs {missing[name]}', missing[name])
      return {'labels': ['a', 'b'], 'files': 4, 'audio_seconds': minutes * 60, 'settings': {'version': 1}}
    return run

  monkeypatch.setattr(suite, 'TASKS', {n: suite.Task(n, 'test task', build(n)) for n in order})
  monkeypatch.setattr(quality, 'preprocess', lambda *a, **k: None)

  def fake_train(flags, overrides, features_dir, workdir):
    os.makedirs(os.path.join(workdir, 'checkpoints'))
    return {'budget': 'config.train_minutes', 'steps': 10, 'train_wall_seconds': 1.0, 'calibration_steps_per_s': None}

  def evaluate(cmd, what):
    workdir = next(a.split('=', 1)[1] for a in cmd if a.startswith('--workdir='))
    f1 = 0.5 + 0.2 * order.index(os.path.basename(workdir))
    os.makedirs(os.path.join(workdir, 'eval'))
    with open(os.path.join(workdir, 'eval', 'report.json'), 'w', encoding='utf-8') as f:
      json.dump({'model': report_figures(f1, 0.4), 'model_trunk': report_figures(f1, 0.4),
                 'baselines': {'logmel_stats': report_figures(0.5, 0.1), 'random_init': report_figures(0.3, 0.1)}}, f)

  monkeypatch.setattr(quality, 'train', fake_train)
  monkeypatch.setattr(quality, '_run', evaluate)
  monkeypatch.setattr(suite, 'nmi_over_kmeans_seeds', lambda workdir, features_dir: {
      rep: 0.3 + 0.1 * order.index(os.path.basename(workdir)) + (0.1 if 'seed_1' in workdir else 0.0)
      for rep in suite.REPRESENTATIONS})


def test_suite_prints_every_task_and_the_average_as_json(tmp_path, monkeypatch, capsys):
  fake_suite(monkeypatch, tmp_path, missing={})
  argv = ['--suite', '--minutes=1', '--suite_minutes=5', f'--data_dir={tmp_path}', f'--workdir={tmp_path / "runs"}']
  quality.main(argv)
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert set(out) >= {'tasks', 'average', 'tasks_averaged', 'skipped'}
  assert list(out['tasks']) == out['tasks_averaged'] == list(suite.TASKS) and out['skipped'] == {}
  for rows in list(out['tasks'].values()) + [out['average']]:
    assert list(rows) == ['model', 'model_trunk', 'logmel_stats', 'random_init']
    for row in rows.values():
      assert list(row) == ['tile_f1', 'clip_f1', 'nmi', 'p_at_5'] and all(0 <= v <= 1 for v in row.values())
  assert out['tasks']['speakers']['model']['tile_f1'] == pytest.approx(0.7)
  assert out['tasks']['speakers']['model']['nmi'] == pytest.approx(0.4)  # the median over k-Means seeds
  assert out['average']['model']['tile_f1'] == pytest.approx(0.7)  # (0.5 + 0.7 + 0.9) / 3
  assert out['average']['logmel_stats']['clip_f1'] == pytest.approx(0.55)
  # Started again, the finished tasks are kept, not trained again.
  monkeypatch.setattr(quality, 'train', lambda *a: pytest.fail('a finished task was trained again'))
  quality.main(argv)
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])['average'] == out['average']
  # A run on an earlier build of a task's set is not taken for one on the set as it is now.
  features_dir = out['datasets']['speakers']['features_dir']
  os.makedirs(features_dir, exist_ok=True)
  with open(os.path.join(features_dir, quality.SET_STAMP), 'w', encoding='utf-8') as f:
    f.write('another build\n')
  with pytest.raises(SystemExit, match='task speakers: .* an earlier build of the set'):
    quality.main(argv)


def test_a_task_without_its_packages_is_skipped_in_one_line_and_left_out_of_the_average(tmp_path, monkeypatch,
                                                                                     capsys):
  fake_suite(monkeypatch, tmp_path, missing={'speakers': ['festival', 'festvox-kallpc16k']})
  quality.main(['--suite', f'--data_dir={tmp_path}', f'--workdir={tmp_path / "runs"}'])
  lines = capsys.readouterr().out.strip().splitlines()
  skip_lines = [line for line in lines if 'skipped' in line and not line.startswith('{')]
  assert skip_lines == ['bench quality --suite: task speakers skipped: needs festival, festvox-kallpc16k, which '
                        'could not be installed.']
  out = json.loads(lines[-1])
  assert out['tasks_averaged'] == ['instruments', 'sounds'] and list(out['tasks']) == ['instruments', 'sounds']
  assert 'festvox-kallpc16k' in out['skipped']['speakers']
  assert out['average']['model']['tile_f1'] == pytest.approx(0.7)  # (0.5 + 0.9) / 2
  assert out['average']['model']['nmi'] == pytest.approx(0.4)  # (0.3 + 0.5) / 2
  assert 'Average over instruments, sounds:' in lines


def test_the_suite_over_training_seeds_gives_each_figure_mean_and_spread(tmp_path, monkeypatch, capsys):
  fake_suite(monkeypatch, tmp_path, missing={})
  trained = []
  fake_train = quality.train
  monkeypatch.setattr(quality, 'train', lambda flags, overrides, features_dir, workdir: (
      trained.append((overrides[-1], os.path.relpath(workdir, tmp_path / 'runs'))),
      fake_train(flags, overrides, features_dir, workdir))[1])
  argv = ['--suite', '--seeds=0,1', f'--data_dir={tmp_path}', f'--workdir={tmp_path / "runs"}']
  quality.main(argv)
  # Seed by seed, every task in each.
  assert trained == [(f'--config.seed={seed}', f'seed_{seed}/{task}') for seed in (0, 1) for task in suite.TASKS]
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert out['seeds'] == [0, 1] and list(out['runs']['sounds']) == ['0', '1']
  # NMI is 0.3 + 0.1 * task (+0.1 for seed 1): per task the mean and sd over the seeds, and the average's sd is
  # that of each seed's average.
  assert out['tasks']['instruments']['model']['nmi'] == pytest.approx(0.35)
  assert out['spread']['instruments']['model']['nmi'] == pytest.approx(0.1 / np.sqrt(2))
  assert out['tasks']['instruments']['model']['tile_f1'] == pytest.approx(0.5)
  assert out['spread']['instruments']['model']['tile_f1'] == pytest.approx(0.0)
  assert out['average']['model']['nmi'] == pytest.approx(0.45)
  assert out['spread']['average']['model']['nmi'] == pytest.approx(0.1 / np.sqrt(2))


@pytest.mark.parametrize('argv', [['--tasks=speakers'], ['--export_hear=/tmp/x'], ['--suite_minutes=5'],
                                  ['--suite', '--seeds=0'], ['--suite', '--suite_minutes=0']])
def test_suite_flags_are_refused_where_they_mean_nothing(argv):
  with pytest.raises(SystemExit):
    quality.parse_flags(argv)


def test_unknown_suite_tasks_are_refused(tmp_path):
  with pytest.raises(SystemExit, match='--tasks=voices'):
    quality.main(['--suite', '--tasks=voices', f'--data_dir={tmp_path}'])


def test_a_smaller_instrument_set_is_built_from_a_share_of_the_tunes_in_a_cache_of_its_own(tmp_path, monkeypatch):
  tunes = {f'pkg-tune{i:02d}': f'/nowhere/{i}.mid' for i in range(41)}
  calls = []
  monkeypatch.setattr(qd, 'ensure_material', lambda install: None)
  monkeypatch.setattr(qd, 'tune_paths', lambda: tunes)
  monkeypatch.setattr(qd, 'build', lambda root, **kw: calls.append((root, kw)) or {})
  suite.build_instruments('R', 20.0, True)
  (root, kw), = calls
  assert len(kw['tunes']) == 10 and set(kw['tunes']) <= set(tunes)  # 41 tunes x 20 / 80 minutes
  assert kw['config']['tunes_kept'] == sorted(kw['tunes'])  # another share is another set, not the cached one
  calls.clear()
  suite.build_instruments('R', 60.0, True)
  assert calls == [('R', {'install': True})]  # today's set, as it is
  assert suite.task_dirs('D', 'instruments', 60.0) == (os.path.join('D', 'data'), os.path.join('D', 'features'))
  assert suite.task_dirs('D', 'instruments', 20.0)[0] == os.path.join('D', 'suite', 'instruments-20min', 'data')
  assert suite.task_dirs('D', 'sounds', 60.0)[1] == os.path.join('D', 'suite', 'sounds', 'features')


def test_features_are_made_again_when_the_set_under_them_was_built_again(tmp_path, monkeypatch):
  data_root, features_dir = tmp_path / 'data', tmp_path / 'features'
  data_root.mkdir()
  runs = []

  def fake_preprocess(cmd, what):
    runs.append(cmd)
    features_dir.mkdir()
    (features_dir / 'features.json').write_text(str(len(runs)))

  monkeypatch.setattr(quality, '_run', fake_preprocess)
  (data_root / 'build.json').write_text('{"settings": {"version": 2}}')
  quality.preprocess(str(data_root), str(features_dir))
  quality.preprocess(str(data_root), str(features_dir))
  assert len(runs) == 1  # the same build: the features are kept
  (data_root / 'build.json').write_text('{"settings": {"version": 3}}')
  quality.preprocess(str(data_root), str(features_dir))
  assert len(runs) == 2 and (features_dir / 'features.json').read_text() == '2'

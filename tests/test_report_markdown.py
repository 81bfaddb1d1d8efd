"""The Markdown report and the terminal table show the report's figures, in percent, in the right places."""

from dem_jax import probes
from dem_jax.report_markdown import format_summary_table, render_report_markdown


def fig(f1_clip, nmi, p_at_k, per_class=(0.5, 0.7)):
  return {
      'linear_probe': {'macro_f1_clip': f1_clip, 'macro_f1_tile': f1_clip - 0.05, 'accuracy': f1_clip + 0.05,
                       'per_class_f1': {'cooking': per_class[0], 'eating': per_class[1]}},
      'kmeans': {'nmi': nmi, 'ari': nmi / 2, 'purity': nmi + 0.2, 'k': 2},
      'kmeans_cosine': {'nmi': nmi + 0.1, 'ari': nmi, 'purity': nmi + 0.3, 'k': 2},
      'retrieval': {'precision_at_k': p_at_k, 'k': 5},
  }


def report(with_folds=True):
  if with_folds:
    model = probes.fold_summary([fig(0.5, 0.2, 0.4, (0.4, 0.6)), fig(0.7, 0.4, 0.6, (0.6, 0.8))])
  else:
    model = fig(0.6, 0.3, 0.5)
  return {
      'model': model,
      'model_trunk': fig(0.8, 0.35, 0.7),
      'baselines': {'logmel_stats': fig(0.45, 0.1, 0.3), 'random_init': fig(0.25, 0.05, 0.2)},
      'checkpoint_step': 12000,
      'settings': {'dataset': 'dcase2018_task5', 'model': {'embedding_dim': 128}, 'folds': [1, 2]},
  }


def table_row(markdown, first_cell):
  rows = [line for line in markdown.splitlines() if line.startswith(f'| {first_cell} |')]
  assert rows, f'no row starting with {first_cell!r}'
  return [cell.strip() for cell in rows[0].strip('|').split('|')]


def test_headline_rows_show_percent_with_fold_std():
  md = render_report_markdown(report(), {})
  assert 'Checkpoint step: 12000' in md
  model = table_row(md, 'Model (embedding)')
  # F1 clip, F1 tile, accuracy, NMI, ARI, purity, NMI cosine, P@5: fold means 0.6/0.55/0.65/0.3/0.15/0.5/0.4/0.5,
  # std 0.1 etc.
  assert model[1:] == ['60.0 ± 10.0', '55.0 ± 10.0', '65.0 ± 10.0', '30.0 ± 10.0', '15.0 ± 5.0', '50.0 ± 10.0',
                       '40.0 ± 10.0', '50.0 ± 10.0']
  assert table_row(md, 'Model trunk (pooled, before the head)')[1:] == ['80.0', '75.0', '85.0', '35.0', '17.5',
                                                                       '55.0', '45.0', '70.0']
  assert table_row(md, 'log-Mel stats baseline')[1] == '45.0'
  assert table_row(md, 'Random-init network')[8] == '20.0'
  assert 'Retrieval P@5' in table_row(md, 'System')


def test_per_class_table_lists_each_class_for_each_system():
  md = render_report_markdown(report(), {})
  assert table_row(md, 'cooking')[1:] == ['50.0 ± 10.0', '50.0', '50.0', '50.0']
  assert table_row(md, 'eating')[1:] == ['70.0 ± 10.0', '70.0', '70.0', '70.0']
  assert '_std' not in md  # the fold summary's std entries are folded into their cells


def test_per_fold_table_only_when_folds_are_given():
  md = render_report_markdown(report(with_folds=True), {})
  assert '## Per fold' in md
  assert table_row(md, '1')[1:3] == ['Model (embedding)', '50.0']
  assert table_row(md, '2')[1:3] == ['Model (embedding)', '70.0']
  assert '## Per fold' not in render_report_markdown(report(with_folds=False), {})


def test_per_fold_cells_scored_once_on_the_pooled_tiles_say_so():
  # One embedding for every fold, as evaluate builds it: a probe per fold, k-Means and retrieval once over the
  # pooled test tiles of all folds.
  r = report(with_folds=False)
  pooled = fig(0.6, 0.3, 0.5)
  r['model'] = probes.fold_summary([{'linear_probe': fig(f1, 0.0, 0.0)['linear_probe']} for f1 in (0.5, 0.7)])
  r['model'] |= {section: pooled[section] for section in ('kmeans', 'kmeans_cosine', 'retrieval')}
  md = render_report_markdown(r, {})
  assert table_row(md, '1') == ['1', 'Model (embedding)', '50.0', '45.0', '55.0'] + ['n/a (pooled)'] * 5
  assert 'k-Means and retrieval are scored once, on the pooled test tiles of all folds' in md.split('## Per fold')[1]
  assert table_row(md, 'Model (embedding)')[4:] == ['30.0', '15.0', '50.0', '40.0', '50.0']  # the headline
  # Per-fold embeddings score every part in each fold: no pooled cell, no note.
  assert 'n/a (pooled)' not in render_report_markdown(report(with_folds=True), {})


def test_settings_are_flattened_and_plots_linked_relative_to_the_report(tmp_path):
  plot_paths = {'embedding_map': str(tmp_path / 'plots' / 'map.png'), 'confusion_matrix': 'cm.png'}
  md = render_report_markdown(report(), plot_paths, relative_to=str(tmp_path))
  assert table_row(md, 'model.embedding_dim')[1] == '128'
  assert table_row(md, 'folds')[1] == '[1, 2]'
  assert '![embedding map](plots/map.png)' in md
  assert md.index('## Settings') < md.index('## Plots')


def test_missing_baseline_and_metric_show_as_not_available():
  r = report(with_folds=False)
  del r['baselines']['random_init']
  del r['model']['kmeans']
  md = render_report_markdown(r, {})
  assert table_row(md, 'Random-init network')[1:] == ['n/a'] * 8
  assert table_row(md, 'Model (embedding)')[4:8] == ['n/a', 'n/a', 'n/a', '40.0']


def test_summary_table_has_one_aligned_line_per_system():
  lines = format_summary_table(report()).splitlines()
  assert lines[0].split() == ['System', 'Probe', 'F1', '/', 'clip', 'k-Means', 'NMI', 'NMI', 'cosine', 'P@5']
  assert lines[2].startswith('Model (embedding)')
  assert lines[2].split()[-12:] == ['60.0', '±', '10.0', '30.0', '±', '10.0', '40.0', '±', '10.0', '50.0', '±',
                                    '10.0']
  assert lines[3].startswith('Model trunk') and lines[3].split()[-4:] == ['80.0', '35.0', '45.0', '70.0']
  assert lines[4].split()[-4:] == ['45.0', '10.0', '20.0', '30.0']
  assert lines[5].startswith('Random-init network')
  assert len({len(line) for line in lines[:6]}) == 1  # columns line up


def test_protocol_and_representations_are_named():
  r = report()
  r['settings']['protocol_name'] = 'per-fold embeddings: fold k is scored on its own'
  r['checkpoint_step'] = {'fold1': 100, 'fold2': 120}
  r['representations'] = {'model': 'the L2-normalised embedding', 'model_trunk': 'the head\'s input'}
  md = render_report_markdown(r, {})
  assert 'Checkpoint steps: fold1 100, fold2 120.' in md
  assert 'Protocol: per-fold embeddings: fold k is scored on its own.' in md
  assert '- Model (embedding): the L2-normalised embedding.' in md
  assert "- Model trunk (pooled, before the head): the head's input." in md


def test_the_embedding_row_names_the_loss_that_trained_it():
  r = report(with_folds=False)
  r['settings']['training_loss'] = 'infonce'
  md = render_report_markdown(r, {})
  assert table_row(md, 'Model (embedding, infonce loss)')[1] == '60.0'
  assert 'Model (embedding, infonce loss)' in format_summary_table(r)

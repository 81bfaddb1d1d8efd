"""report.json -> a Markdown report a person reads, and a short table for the terminal.

The report dict: {"model": FIG, "model_trunk": FIG, "baselines": {"logmel_stats": FIG, "random_init": FIG},
"representations": {key: what it is}, "checkpoint_step": N (or {fold: N} with per-fold embeddings),
"settings": {..., "protocol_name": ...}, optionally "folds": {...}}. A FIG is {"linear_probe": {...},
"kmeans": {...}, "kmeans_cosine": {...}, "retrieval": {...}} as `dem_jax.probes` returns them; over several folds
it is `probes.fold_summary`'s output: means, `<name>_std` beside them and the per-fold FIGs under "folds".
Missing parts show as "n/a"; in the per-fold table, a part scored once over the pooled test tiles of all folds (one
embedding for every fold: k-Means and retrieval) shows as "n/a (pooled)", with a note under the table saying so.
Figures are shown in percent.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

__all__ = ['render_report_markdown', 'format_summary_table']

# (key in the report, name shown).
SYSTEMS = (
    ('model', 'Model (embedding)'),  # the training loss is named where settings.training_loss gives it
    ('model_trunk', 'Model trunk (pooled, before the head)'),
    ('logmel_stats', 'log-Mel stats baseline'),
    ('random_init', 'Random-init network'),
)

# (column name, section of a FIG, metric).
HEADLINE = (
    ('Probe macro F1 / clip', 'linear_probe', 'macro_f1_clip'),
    ('Probe macro F1 / tile', 'linear_probe', 'macro_f1_tile'),
    ('Probe accuracy', 'linear_probe', 'accuracy'),
    ('k-Means NMI', 'kmeans', 'nmi'),
    ('k-Means ARI', 'kmeans', 'ari'),
    ('k-Means purity', 'kmeans', 'purity'),
    ('k-Means NMI, cosine', 'kmeans_cosine', 'nmi'),
    ('Retrieval P@k', 'retrieval', 'precision_at_k'),
)

NA = 'n/a'
POOLED = 'n/a (pooled)'
POOLED_NOTE = ('n/a (pooled): with one embedding for every fold, k-Means and retrieval are scored once, on the pooled '
               "test tiles of all folds (the headline's figures), not per fold; one fold's test part may hold a single "
               "session of a class, and retrieval never counts the query's own session.")


def _system_names(report: Mapping[str, Any]) -> dict[str, str]:
  """{key: name shown}; the embedding's name says which loss trained it, where the report knows."""
  names = dict(SYSTEMS)
  loss = (report.get('settings') or {}).get('training_loss')
  if loss:
    names['model'] = f'Model (embedding, {loss} loss)'
  return names


def _system_figs(report: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any] | None]]:
  baselines = report.get('baselines') or {}
  figs = []
  for key, name in _system_names(report).items():
    fig = report.get(key) if key.startswith('model') else baselines.get(key)
    figs.append((name, fig if isinstance(fig, Mapping) else None))
  return figs


def _number(value) -> float | None:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return None
  return None if math.isnan(value) else float(value)


def _metric(fig: Mapping[str, Any] | None, section: str, name: str, with_std: bool = True) -> str:
  """'62.2 ± 1.3' (percent; the std where the fold summary gives one), or 'n/a'."""
  part = (fig or {}).get(section) or {}
  value = _number(part.get(name))
  if value is None:
    return NA
  text = f'{100 * value:.1f}'
  std = _number(part.get(f'{name}_std'))
  if with_std and std is not None:
    text += f' ± {100 * std:.1f}'
  return text


def _retrieval_k(report: Mapping[str, Any]) -> str:
  for _, fig in _system_figs(report):
    k = ((fig or {}).get('retrieval') or {}).get('k')
    if k is not None:
      return str(int(k))
  return 'k'


def _headline_columns(report: Mapping[str, Any]) -> list[str]:
  k = _retrieval_k(report)
  return [name.replace('P@k', f'P@{k}') for name, _, _ in HEADLINE]


def _table(header: list[str], rows: list[list[str]], align: list[str] | None = None) -> list[str]:
  align = align or ['---'] + ['---:'] * (len(header) - 1)
  lines = ['| ' + ' | '.join(_cell(h) for h in header) + ' |', '|' + '|'.join(align) + '|']
  lines += ['| ' + ' | '.join(_cell(c) for c in row) + ' |' for row in rows]
  return lines


def _cell(value: Any) -> str:
  return str(value).replace('|', '\\|').replace('\n', ' ')


def _flatten(settings: Mapping[str, Any], prefix: str = '') -> list[tuple[str, Any]]:
  items = []
  for key, value in settings.items():
    name = f'{prefix}{key}'
    if isinstance(value, Mapping) and value:
      items += _flatten(value, f'{name}.')
    else:
      items.append((name, value))
  return items


def _setting_text(value: Any) -> str:
  if isinstance(value, str):
    return value
  try:
    return json.dumps(value)
  except TypeError:
    return repr(value)


def _class_names(figs) -> list[str]:
  names: list[str] = []
  for _, fig in figs:
    per_class = ((fig or {}).get('linear_probe') or {}).get('per_class_f1') or {}
    for name in per_class:
      if name.endswith('_std') and name[:-4] in per_class:
        continue  # the fold summary's std beside a class, shown in that class's cell
      if name not in names:
        names.append(name)
  return names


def _per_fold_section(report, figs) -> list[str]:
  folded = [(name, fig['folds']) for name, fig in figs if fig and isinstance(fig.get('folds'), list)]
  if not folded:
    return []
  lines = ['## Per fold', '']
  rows = []
  pooled = False
  summaries = {name: fig for name, fig in figs if fig}
  num_folds = max(len(folds) for _, folds in folded)
  for index in range(num_folds):
    for name, folds in folded:
      if index < len(folds):
        fold = folds[index]
        label = fold.get('fold', index + 1) if isinstance(fold, Mapping) else index + 1
        row = [str(label), name]
        for _, section, metric in HEADLINE:
          # A section the summary has but the fold lacks was scored once over the folds' pooled test tiles.
          if not (fold if isinstance(fold, Mapping) else {}).get(section) and summaries[name].get(section):
            row.append(POOLED)
            pooled = True
          else:
            row.append(_metric(fold, section, metric))
        rows.append(row)
  header = ['Fold', 'System'] + _headline_columns(report)
  lines += _table(header, rows, ['---', '---'] + ['---:'] * len(HEADLINE))
  return lines + ([''] + [POOLED_NOTE] if pooled else []) + ['']


def render_report_markdown(
    report: Mapping[str, Any],
    plot_paths: Mapping[str, str] | None = None,
    *,
    relative_to: str | None = None,
) -> str:
  """The Markdown report: headline, per-class F1, per fold (when folds are given), settings, plots.

  plot_paths maps a plot's name to its PNG; with relative_to (the folder the .md is written to) the
  links are made relative to it, so the report and its plots move together.
  """
  figs = _system_figs(report)
  lines = ['# dem_jax evaluation report', '']
  step = report.get('checkpoint_step')
  if isinstance(step, Mapping):
    intro = 'Checkpoint steps: ' + ', '.join(f'{fold} {s}' for fold, s in step.items()) + '. '
  else:
    intro = f'Checkpoint step: {step}. ' if step is not None else ''
  intro += 'Figures in percent'
  if any(fig and fig.get('folds') for _, fig in figs):
    intro += '; mean ± std over folds, per-fold figures below'
  lines += [intro + '.', '']
  protocol = (report.get('settings') or {}).get('protocol_name')
  if protocol:
    lines += [f'Protocol: {protocol}.', '']
  descriptions = report.get('representations') or {}
  if descriptions:
    lines += ['## Representations', '']
    names = _system_names(report)
    lines += [f'- {names.get(key, key)}: {text}.' for key, text in descriptions.items()]
    lines += ['- k-Means: on standardised features, and on the unit sphere (rows L2-normalised: "cosine").', '']

  lines += ['## Headline', '']
  rows = [[name] + [_metric(fig, section, metric) for _, section, metric in HEADLINE] for name, fig in figs]
  lines += _table(['System'] + _headline_columns(report), rows) + ['']

  class_names = _class_names(figs)
  if class_names:
    lines += ['## Per-class F1 (linear probe, per clip)', '']
    rows = []
    for class_name in class_names:
      row = [class_name]
      for _, fig in figs:
        probe = (fig or {}).get('linear_probe') or {}
        per_class = dict(probe.get('per_class_f1') or {})
        per_class.update({f'{k}_std': v for k, v in (probe.get('per_class_f1_std') or {}).items()})
        row.append(_metric({'per_class_f1': per_class}, 'per_class_f1', class_name))
      rows.append(row)
    lines += _table(['Class'] + [name for name, _ in figs], rows) + ['']

  lines += _per_fold_section(report, figs)

  settings = dict(report.get('settings') or {})
  if isinstance(report.get('folds'), Mapping):
    settings['folds'] = report['folds']
  if settings:
    lines += ['## Settings', '']
    lines += _table(['Setting', 'Value'], [[k, _setting_text(v)] for k, v in _flatten(settings)],
                    ['---', '---']) + ['']

  if plot_paths:
    lines += ['## Plots', '']
    for name, path in plot_paths.items():
      link = os.path.relpath(path, relative_to) if relative_to is not None else os.fspath(path)
      link = link.replace(os.sep, '/')
      title = name.replace('_', ' ')
      lines += [f'### {title}', '', f'![{title}]({link})', '']
  return '\n'.join(lines).rstrip('\n') + '\n'


def format_summary_table(report: Mapping[str, Any]) -> str:
  """Plain-text table for the terminal: each system's probe F1 per clip, k-Means NMI (standardised and cosine) and
  retrieval P@k, in %."""
  header = ['System', 'Probe F1 / clip', 'k-Means NMI', 'NMI cosine', f'P@{_retrieval_k(report)}']
  rows = [[name, _metric(fig, 'linear_probe', 'macro_f1_clip'), _metric(fig, 'kmeans', 'nmi'),
           _metric(fig, 'kmeans_cosine', 'nmi'), _metric(fig, 'retrieval', 'precision_at_k')]
          for name, fig in _system_figs(report)]
  widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

  def line(cells):
    return '  '.join([cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])])

  out = [line(header), '  '.join('-' * w for w in widths)] + [line(r) for r in rows]
  return '\n'.join(out) + '\n(figures in %)'

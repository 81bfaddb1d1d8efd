"""Probes, clusters and retrieval on synthetic embeddings whose structure is known."""

import json
import math

import numpy as np
import pytest

from dem_jax import probes

NAMES = ['a', 'b', 'c', 'd']


def separable(num_per_class=40, num_classes=4, dim=16, seed=0):
  """Tight, far-apart class blobs; consecutive pairs of tiles form a clip, 5 clips a group."""
  rng = np.random.default_rng(seed)
  y = np.repeat(np.arange(num_classes), num_per_class)
  centres = 10.0 * np.eye(num_classes, dim)
  x = centres[y] + 0.1 * rng.standard_normal((len(y), dim))
  clips = np.arange(len(y)) // 2
  groups = clips // 5
  return x.astype(np.float32), y, clips, groups


def test_linear_probe_is_perfect_on_separable_clusters():
  x, y, clips, _ = separable()
  result = probes.linear_probe(x[::2], y[::2], x[1::2], y[1::2], test_clip_ids=clips[1::2], label_names=NAMES)
  assert result['macro_f1_clip'] == 1.0
  assert result['macro_f1_tile'] == 1.0
  assert result['accuracy'] == 1.0
  assert result['per_class_f1'] == {n: 1.0 for n in NAMES}
  assert np.array_equal(result['confusion_matrix'], np.diag([20, 20, 20, 20]))
  assert result['labels'] == NAMES
  assert (result['num_train'], result['num_test_tiles'], result['num_test_clips']) == (80, 80, 80)
  json.dumps(result)  # report.json takes it as it is


def test_linear_probe_is_near_chance_on_random_embeddings():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((800, 32))
  y = np.tile(np.arange(4), 200)
  result = probes.linear_probe(x[:400], y[:400], x[400:], y[400:])
  assert result['macro_f1_tile'] < 0.4  # chance is 0.25
  assert result['accuracy'] < 0.4


def test_clip_pooling_fixes_tiles_that_the_averaged_probabilities_outvote():
  # Train: class 0 around -1, class 1 around +1 (mirror images, so the boundary sits at 0).
  train_x = np.concatenate([-np.linspace(0.5, 1.5, 50), np.linspace(0.5, 1.5, 50)])[:, None]
  train_y = np.repeat([0, 1], 50)
  # Each test clip: one tile deep on its side, one just over the boundary. Per tile, half are wrong; per clip
  # the confident tile outweighs the unsure one (p(wrong) at 0.5 < 1 - p(wrong) at 3).
  test_x = np.array([[-3.0], [0.5], [-3.0], [0.5], [3.0], [-0.5], [3.0], [-0.5]])
  test_y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
  clips = np.array(['c0', 'c0', 'c1', 'c1', 'c2', 'c2', 'c3', 'c3'])
  result = probes.linear_probe(train_x, train_y, test_x, test_y, test_clip_ids=clips)
  assert result['accuracy_tile'] == 0.5
  assert result['accuracy'] == 1.0
  assert result['macro_f1_clip'] == 1.0
  assert result['macro_f1_tile'] < result['macro_f1_clip']
  assert result['num_test_clips'] == 4


def test_linear_probe_without_clip_ids_scores_each_tile_as_a_clip():
  x, y, _, _ = separable(seed=2)
  x[1] = x[-1]  # one test tile of class 0 sits in class 3's blob
  result = probes.linear_probe(x[::2], y[::2], x[1::2], y[1::2], label_names=NAMES)
  assert result['macro_f1_clip'] == result['macro_f1_tile'] < 1.0
  assert result['num_test_clips'] == result['num_test_tiles'] == 80


def test_linear_probe_rejects_a_clip_with_two_labels():
  x, y, clips, _ = separable()
  with pytest.raises(ValueError, match='different labels'):
    probes.linear_probe(x, y, x[:4], np.array([0, 0, 1, 1]), test_clip_ids=np.zeros(4))


def test_linear_probe_macro_f1_counts_every_class_of_the_label_set():
  x, y, clips, _ = separable()
  keep = y < 3  # class 'd' never occurs: its F1 is 0 and the macro mean is over all 4 classes
  result = probes.linear_probe(x[keep][::2], y[keep][::2], x[keep][1::2], y[keep][1::2], label_names=NAMES)
  assert result['per_class_f1']['d'] == 0.0
  assert result['macro_f1_tile'] == pytest.approx(0.75)


def test_kmeans_recovers_separable_clusters_and_counts_every_tile():
  x, y, _, _ = separable()
  scores, assignments = probes.kmeans_scores(x, y, label_names=NAMES, return_assignments=True)
  assert scores['nmi'] == pytest.approx(1.0)
  assert scores['ari'] == pytest.approx(1.0)
  assert scores['purity'] == 1.0
  assert scores['k'] == 4
  composition = np.array(scores['composition'])
  assert composition.shape == (4, 4)
  assert composition.sum() == len(x)
  assert sorted(composition.max(axis=1)) == [40, 40, 40, 40]
  assert assignments.shape == (len(x),)
  assert np.array_equal(np.bincount(assignments, minlength=4), composition.sum(axis=1))
  json.dumps(scores)


def test_kmeans_on_random_embeddings_finds_little_label_structure():
  rng = np.random.default_rng(3)
  x = rng.standard_normal((400, 8))
  y = rng.integers(0, 4, 400)
  scores = probes.kmeans_scores(x, y, k=6)
  assert scores['nmi'] < 0.1
  assert abs(scores['ari']) < 0.05
  assert np.array(scores['composition']).shape == (6, 4)
  assert np.array(scores['composition']).sum() == 400


def test_kmeans_on_the_unit_sphere_groups_by_direction_where_standardised_groups_by_length():
  # Two classes along two directions, each point's length drawn over three orders of magnitude: the lengths
  # dominate the standardised space, the directions alone remain on the unit sphere.
  rng = np.random.default_rng(4)
  y = np.repeat([0, 1], 100)
  directions = np.array([[1.0, 0.2, 0.0], [0.2, 1.0, 0.0]])
  lengths = 10.0 ** rng.uniform(-1, 2, len(y))
  x = directions[y] * lengths[:, None] + 0.01 * rng.standard_normal((len(y), 3)) * lengths[:, None]
  cosine = probes.kmeans_scores(x, y, space='cosine')
  standardised = probes.kmeans_scores(x, y)
  assert cosine['space'] == 'cosine' and standardised['space'] == 'standardised'
  assert cosine['nmi'] == pytest.approx(1.0) and cosine['purity'] == 1.0
  assert standardised['nmi'] < 0.5
  with pytest.raises(ValueError, match='space must be one of'):
    probes.kmeans_scores(x, y, space='euclidean')


def test_retrieval_is_perfect_on_separable_clusters_with_clips_and_groups_excluded():
  x, y, clips, groups = separable()
  result = probes.retrieval_precision(x, y, k=5, clip_ids=clips, groups=groups)
  assert result == {'precision_at_k': 1.0, 'k': 5, 'num_queries': 160, 'num_skipped': 0}


def test_retrieval_is_near_chance_on_random_labels():
  rng = np.random.default_rng(4)
  x = rng.standard_normal((1000, 16))
  y = rng.integers(0, 4, 1000)
  assert probes.retrieval_precision(x, y, k=5)['precision_at_k'] == pytest.approx(0.25, abs=0.05)


def test_retrieval_excludes_tiles_of_the_query_clip():
  # One clip of 3 tiles per label: the only same-label neighbours are the query's own clip-mates.
  rng = np.random.default_rng(5)
  y = np.repeat(np.arange(10), 3)
  x = 5.0 * rng.standard_normal((10, 8))[y] + 0.01 * rng.standard_normal((30, 8))
  assert probes.retrieval_precision(x, y, k=2)['precision_at_k'] == 1.0
  assert probes.retrieval_precision(x, y, k=2, clip_ids=y)['precision_at_k'] == 0.0


def test_retrieval_excludes_the_query_group():
  # Group 0 holds labels 0 and 1, group 1 labels 2 and 3, two clips each: same-label clips share a group.
  rng = np.random.default_rng(6)
  y = np.repeat([0, 0, 1, 1, 2, 2, 3, 3], 2)
  clips = np.repeat(np.arange(8), 2)
  groups = (y >= 2).astype(int)
  x = 5.0 * rng.standard_normal((4, 8))[y] + 0.01 * rng.standard_normal((16, 8))
  assert probes.retrieval_precision(x, y, k=2, clip_ids=clips)['precision_at_k'] == 1.0
  assert probes.retrieval_precision(x, y, k=2, clip_ids=clips, groups=groups)['precision_at_k'] == 0.0


def test_retrieval_skips_queries_with_too_few_candidates():
  x, y, clips, groups = separable(num_per_class=5)  # 20 tiles in groups of 10: 10 candidates per query
  result = probes.retrieval_precision(x, y, k=10, clip_ids=clips, groups=groups)
  assert result['num_queries'] == 20
  with pytest.raises(ValueError, match='lower k'):
    probes.retrieval_precision(x, y, k=11, clip_ids=clips, groups=groups)


def test_retrieval_blocks_match_a_full_distance_matrix():
  rng = np.random.default_rng(7)
  x = rng.standard_normal((120, 8))
  y = rng.integers(0, 3, 120)
  clips = np.arange(120) // 3
  groups = clips % 7
  for metric in ('cosine', 'euclidean'):
    if metric == 'cosine':
      z = x / np.linalg.norm(x, axis=1, keepdims=True)
      dist = -(z @ z.T)
    else:
      dist = ((x[:, None] - x[None]) ** 2).sum(-1)
    dist[(clips[:, None] == clips[None]) | (groups[:, None] == groups[None])] = np.inf
    top = np.argsort(dist, axis=1)[:, :4]
    expected = (y[top] == y[:, None]).mean()
    for block_size in (7, 1000):
      result = probes.retrieval_precision(x, y, k=4, clip_ids=clips, groups=groups, metric=metric,
                                          block_size=block_size)
      assert result['precision_at_k'] == pytest.approx(expected)


def test_retrieval_metric_changes_the_neighbours():
  # (1, 0) and (100, 0) point the same way (cosine neighbours) but (1, 1) is nearer to (1, 0) in distance.
  x = np.array([[1.0, 0.0], [100.0, 0.0], [1.0, 1.0]])
  y = np.array([0, 0, 1])
  assert probes.retrieval_precision(x, y, k=1, metric='cosine')['precision_at_k'] == pytest.approx(2 / 3)
  assert probes.retrieval_precision(x, y, k=1, metric='euclidean')['precision_at_k'] == pytest.approx(1 / 3)


def test_logmel_stats_embedding_is_band_means_then_band_stds():
  rng = np.random.default_rng(8)
  tiles = rng.standard_normal((5, 20, 6)).astype(np.float32)
  tiles[0] = np.arange(6)  # constant over time: means 0..5, stds 0
  emb = probes.logmel_stats_embedding(tiles, chunk_size=2)
  assert emb.shape == (5, 12)
  assert emb.dtype == np.float32
  np.testing.assert_allclose(emb[0], np.r_[np.arange(6), np.zeros(6)])
  np.testing.assert_allclose(emb[:, :6], tiles.mean(axis=1), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(emb[:, 6:], tiles.std(axis=1), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match=r'\[N, T, M\]'):
    probes.logmel_stats_embedding(tiles[0])


def test_silhouette_is_high_for_separable_clusters_and_nan_for_one_label():
  x, y, _, _ = separable(num_per_class=600)  # 2400 points: subsampled to max_samples
  assert probes.silhouette(x, y, max_samples=500) > 0.9
  assert math.isnan(probes.silhouette(x, np.zeros(len(x), int)))
  rng = np.random.default_rng(9)
  assert abs(probes.silhouette(rng.standard_normal((300, 8)), rng.integers(0, 3, 300))) < 0.1


def test_centroid_distances_of_known_centroids():
  x = np.array([[0.0, 0.0], [0.0, 0.0], [2.0, 4.0], [4.0, 4.0]])
  y = np.array([0, 0, 1, 1])  # centroids (0, 0) and (3, 4); label 2 absent
  d = probes.centroid_distances(x, y, num_classes=3)
  assert d.shape == (3, 3)
  np.testing.assert_allclose(d[:2, :2], [[0.0, 5.0], [5.0, 0.0]])
  assert np.isnan(d[2]).all() and np.isnan(d[:, 2]).all()


def test_fold_summary_mean_and_std_on_known_numbers():
  folds = [
      {'linear_probe': {'macro_f1_clip': 0.5, 'labels': ['a', 'b'], 'confusion_matrix': [[1, 0], [0, 1]]},
       'kmeans': {'k': 9, 'nmi': 0.2}, 'retrieval': {'num_queries': 10}},
      {'linear_probe': {'macro_f1_clip': 0.7, 'labels': ['a', 'b'], 'confusion_matrix': [[3, 2], [0, 1]]},
       'kmeans': {'k': 9, 'nmi': 0.4}, 'retrieval': {'num_queries': 20}},
  ]
  summary = probes.fold_summary(folds)
  assert summary['linear_probe']['macro_f1_clip'] == pytest.approx(0.6)
  assert summary['linear_probe']['macro_f1_clip_std'] == pytest.approx(0.1)
  assert summary['kmeans']['nmi'] == pytest.approx(0.3)
  assert summary['kmeans']['nmi_std'] == pytest.approx(0.1)
  assert summary['kmeans']['k'] == 9 and 'k_std' not in summary['kmeans']
  assert summary['retrieval'] == {'num_queries': 15.0, 'num_queries_std': 5.0}
  assert summary['linear_probe']['labels'] == ['a', 'b']
  assert summary['linear_probe']['confusion_matrix'] == [[2.0, 1.0], [0.0, 1.0]]
  assert summary['folds'] == folds and summary['num_folds'] == 2
  json.dumps(summary)


def test_fold_summary_rejects_folds_with_different_keys():
  with pytest.raises(ValueError, match='fold 2'):
    probes.fold_summary([{'a': 1.0}, {'b': 1.0}])

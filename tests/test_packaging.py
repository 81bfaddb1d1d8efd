"""dem_jax as a library: the wheel's contents and metadata, the configs under the dem_jax name, the dem-jax command."""

import email.parser
import os
import re
import subprocess
import sys
import zipfile

import pytest
from absl import flags
from ml_collections import config_flags

from dem_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ('base', 'dcase', 'features', 'music')


@pytest.fixture(scope='module')
def wheel(tmp_path_factory):
  """The wheel built from this checkout, offline (no index, no build isolation)."""
  out = tmp_path_factory.mktemp('wheel')
  subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '--no-index', '-q',
                  '-w', str(out), ROOT], check=True, capture_output=True)
  (name,) = os.listdir(out)
  return zipfile.ZipFile(out / name)


def dist_info(wheel, name):
  (path,) = [n for n in wheel.namelist() if n.endswith(f'.dist-info/{name}')]
  return wheel.read(path).decode()


def test_wheel_installs_dem_jax_alone_with_its_configs_commands_and_native_sources(wheel):
  names = set(wheel.namelist())
  assert dist_info(wheel, 'top_level.txt').split() == ['dem_jax']
  assert {n.split('/')[0] for n in names} == {'dem_jax', 'dem_jax-0.1.0.dist-info'}
  commands = {f'dem_jax/commands/{n}' for n in os.listdir(os.path.join(ROOT, 'dem_jax', 'commands'))
              if n.endswith('.py')}
  expected = {'dem_jax/ops/native/onednn_conv.cc', 'dem_jax/cli.py', 'dem_jax/__main__.py', 'dem_jax/hear.py',
              'dem_jax/preprocess/job.py', 'dem_jax/preprocess/sample_data.py'} | commands
  expected |= {f'dem_jax/configs/{c}.py' for c in CONFIGS}
  assert expected <= names, sorted(expected - names)
  # Every package folder of the checkout is in the wheel (setup.cfg lists them).
  for folder, _, files in os.walk(os.path.join(ROOT, 'dem_jax')):
    if '__init__.py' in files:
      assert os.path.relpath(os.path.join(folder, '__init__.py'), ROOT) in names, folder


def test_wheel_requires_lower_bounds_and_offers_the_extras(wheel):
  metadata = email.parser.Parser().parsestr(dist_info(wheel, 'METADATA'))
  requires = metadata.get_all('Requires-Dist')
  assert not [r for r in requires if '==' in r.split(';')[0]], 'exact pins belong in constraints.txt'
  assert {'plots', 'tensorboard', 'onednn', 'hear', 'cuda', 'test'} <= set(metadata.get_all('Provides-Extra'))
  core = [r for r in requires if 'extra ==' not in r]
  assert not [r for r in core if re.match(r'(torch|matplotlib|tensorboardX|onednn)', r)], core
  assert re.search(r'^dem-jax = dem_jax\.cli:main$', dist_info(wheel, 'entry_points.txt'), re.M)


def test_constraints_pin_every_requirement_exactly():
  with open(os.path.join(ROOT, 'constraints.txt')) as f:
    pinned = {re.split('==', line)[0].lower().replace('_', '-') for line in f if '==' in line}
  with open(os.path.join(ROOT, 'setup.cfg')) as f:
    required = {m.group(1).lower().replace('_', '-')
                for m in re.finditer(r'^    ([A-Za-z][A-Za-z0-9_.-]*)(\[[a-z0-9]+\])?>=', f.read(), re.M)}
  assert required and required <= pinned, sorted(required - pinned)


@pytest.mark.parametrize('name', CONFIGS)
def test_configs_load_by_import_by_path_and_by_short_name(name):
  import importlib
  from dem_jax import configs
  module = importlib.import_module(f'dem_jax.configs.{name}')
  assert os.path.samefile(module.__file__, os.path.join(ROOT, 'configs', f'{name}.py'))  # one home, no copy
  by_import = module.get_config()
  for value in (os.path.join(ROOT, 'configs', f'{name}.py'), configs.resolve(name)):
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file('config', None, flag_values=flag_values)
    flag_values(['prog', f'--config={value}'])
    assert flag_values.config.to_dict() == by_import.to_dict(), value


def test_short_config_names_resolve_only_where_no_such_path_exists(tmp_path, monkeypatch):
  from dem_jax import configs
  assert configs.resolve('dcase:tiny') == os.path.join(ROOT, 'configs', 'dcase.py') + ':tiny'
  assert configs.resolve('configs/dcase.py:cpu') == 'configs/dcase.py:cpu'
  assert configs.resolve('mine.py') == 'mine.py'
  assert cli.resolve_config_arguments(['--config', 'music', '--config.seed=1', '--workdir=w']) == [
      '--config', os.path.join(ROOT, 'configs', 'music.py'), '--config.seed=1', '--workdir=w']
  monkeypatch.chdir(tmp_path)
  (tmp_path / 'dcase').write_text('')
  assert configs.resolve('dcase') == 'dcase'  # the user's own file of that name wins


def test_help_exits_zero_and_lists_the_commands_flags():
  dem_jax = os.path.join(os.path.dirname(sys.executable), 'dem-jax')
  result = subprocess.run([dem_jax, '--help'], capture_output=True, text=True, timeout=60)
  assert result.returncode == 0
  assert set(re.findall(r'^  ([a-z_]+) ', result.stdout, re.M)) == set(cli.command_names())
  for command, flag in (('preprocess', '--num_workers'), ('train', '--workdir'), ('sample_data', '--layout'),
                        ('bench', 'train_step')):
    result = subprocess.run([dem_jax, command, '--help'], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and flag in result.stdout, (command, result.stdout[-500:], result.stderr[-500:])


def test_help_into_a_closed_pipe_says_nothing():
  proc = subprocess.Popen([sys.executable, '-m', 'dem_jax', 'train', '--help'], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  proc.stdout.close()  # as `| head` does once it has its lines
  assert proc.stderr.read() == ''
  proc.wait(timeout=60)


def test_short_config_names_are_not_taken_for_a_data_folder_of_that_name(tmp_path, monkeypatch):
  from dem_jax import configs
  monkeypatch.chdir(tmp_path)
  (tmp_path / 'music').mkdir()  # /data/music, the README's own layout
  assert configs.resolve('music:tiny') == os.path.join(ROOT, 'configs', 'music.py') + ':tiny'


def test_unknown_command_exits_2_naming_it():
  result = subprocess.run([sys.executable, '-m', 'dem_jax', 'trian'], capture_output=True, text=True, timeout=60)
  assert result.returncode == 2 and "unknown command 'trian'" in result.stderr


def test_dispatcher_sets_cpu_malloc_only_for_xla_on_the_cpu(monkeypatch):
  from dem_jax import process
  monkeypatch.setattr(process, 'accelerator_plugin_installed', lambda: False)
  assert process.cpu_malloc_environment('train', [], {})['MALLOC_ARENA_MAX'] == '1'
  assert 'MALLOC_ARENA_MAX' not in process.cpu_malloc_environment('preprocess', [], {})
  assert 'MALLOC_ARENA_MAX' not in process.cpu_malloc_environment('bench', ['preprocess'], {})
  assert process.cpu_malloc_environment('bench', ['train_step'], {})['MALLOC_ARENA_MAX'] == '1'
  assert process.cpu_malloc_environment('embed', [], {'MALLOC_ARENA_MAX': '4'})['MALLOC_ARENA_MAX'] == '4'
  monkeypatch.setattr(process, 'accelerator_plugin_installed', lambda: True)
  assert 'MALLOC_ARENA_MAX' not in process.cpu_malloc_environment('train', [], {})


def _imports(path):
  import ast
  with open(path, encoding='utf-8') as f:
    tree = ast.parse(f.read())
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      yield from (a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      yield node.module
      yield from (f'{node.module}.{a.name}' for a in node.names)


def library_files():
  """The library's modules: all of the installed package but the command lines and the dispatcher."""
  front_door = {os.path.join('dem_jax', 'cli.py'), os.path.join('dem_jax', '__main__.py')}
  for top in ('dem_jax', 'configs', 'preprocess'):
    for folder, _, files in os.walk(os.path.join(ROOT, top)):
      for name in files:
        rel = os.path.relpath(os.path.join(folder, name), ROOT)
        if name.endswith('.py') and rel not in front_door and not rel.startswith(os.path.join('dem_jax', 'commands')):
          yield rel


def test_no_library_module_imports_the_command_lines_or_runs_as_a_script():
  library = list(library_files())
  assert os.path.join('dem_jax', 'train.py') in library and os.path.join('preprocess', 'job.py') in library
  offenders = [(rel, name) for rel in library for name in _imports(os.path.join(ROOT, rel))
               if name.startswith(('dem_jax.commands', 'dem_jax.cli')) or name in ('configs', 'preprocess')
               or name.startswith(('configs.', 'preprocess.'))]
  assert not offenders, offenders
  # Two modules run as their own process by design: the native build that setup runs, and the PyTorch reference
  # that runs in another environment.
  scripts = {os.path.join('dem_jax', 'ops', 'onednn.py'), os.path.join('dem_jax', 'benchmarks', 'torch_reference.py')}
  tails = [rel for rel in library if rel not in scripts
           and "if __name__ == '__main__':" in open(os.path.join(ROOT, rel), encoding='utf-8').read()]
  assert not tails, tails


def test_library_modules_define_no_flags_and_command_mains_import():
  script = ('import dem_jax.embed, dem_jax.evaluate, dem_jax.hear, dem_jax.train, dem_jax.preprocess.job\n'
            'import dem_jax.preprocess.sample_data, dem_jax.demo, dem_jax.cli\n'
            'from absl import flags\n'
            "assert not [f for f in ('workdir', 'out', 'output_dir', 'config') if f in flags.FLAGS], 'library flags'\n"
            'from dem_jax.commands.embed import main\n'
            "assert 'workdir' in flags.FLAGS and callable(main)\n")
  result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert result.returncode == 0, result.stderr[-2000:]


def test_wheel_runs_the_whole_pipeline_from_a_project_with_its_own_configs_and_preprocess(wheel, tmp_path):
  """pip install of the wheel into a fresh venv; the commands run from a folder whose own `configs` and `preprocess`
  packages come first on sys.path, as in a user's project."""
  import sysconfig
  import venv
  env_dir = tmp_path / 'venv'
  venv.create(env_dir, with_pip=True)
  python = str(env_dir / 'bin' / 'python')
  subprocess.run([python, '-m', 'pip', 'install', '--no-deps', '--no-index', '-q', wheel.filename], check=True,
                 capture_output=True)
  # The dependencies come from this environment (a path entry, not a site dir: its editable dem_jax stays out).
  site = subprocess.run([python, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                        capture_output=True, text=True, check=True).stdout.strip()
  with open(os.path.join(site, 'dependencies.pth'), 'w') as f:
    f.write(sysconfig.get_paths()['purelib'] + '\n')
  project = tmp_path / 'project'
  for package in ('configs', 'preprocess'):
    (project / package).mkdir(parents=True)
    (project / package / '__init__.py').write_text('MINE = True\n')
  dem_jax = str(env_dir / 'bin' / 'dem-jax')
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'} | {'PYTHONPATH': str(project)}

  def run(*args):
    result = subprocess.run([dem_jax, *args], cwd=project, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (args, result.stdout[-2000:], result.stderr[-3000:])
    return result.stdout

  check = subprocess.run([python, '-c', 'import dem_jax, configs; print(dem_jax.__file__, configs.MINE)'], cwd=project,
                         env=env, capture_output=True, text=True, check=True).stdout
  assert str(env_dir) in check and check.split()[1] == 'True'
  run('sample_data', '--layout=folder', '--out=audio', '--songs_per_genre=3')
  run('preprocess', '--dataset=folder', '--data_dir=audio', '--output_dir=features', '--num_workers=1')
  run('train', '--config=music:tiny', '--workdir=run', '--config.features_dir=features', '--config.num_steps=2',
      '--config.batch_size=8', '--config.data.tile_seconds=1', '--config.data.neighbour_seconds=1')
  assert 'report:' in run('evaluate', '--workdir=run', '--output_dir=report', '--noplot')
  assert '"written": 3' in run('embed', '--workdir=run', '--input=audio/house', '--output_dir=embeddings')

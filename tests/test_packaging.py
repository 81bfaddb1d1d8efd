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


def test_wheel_holds_the_native_sources_configs_and_preprocessing(wheel):
  names = set(wheel.namelist())
  expected = {'dem_jax/ops/native/onednn_conv.cc', 'dem_jax/cli.py', 'dem_jax/hear.py', 'dem_jax/preprocess/__main__.py',
              'preprocess/job.py', 'preprocess/__main__.py'}
  expected |= {f'dem_jax/configs/{c}.py' for c in CONFIGS} | {f'configs/{c}.py' for c in CONFIGS}
  assert expected <= names, sorted(expected - names)
  assert not [n for n in names if n.startswith('tests/')]


def test_wheel_requires_lower_bounds_and_offers_the_extras(wheel):
  metadata = email.parser.Parser().parsestr(dist_info(wheel, 'METADATA'))
  requires = metadata.get_all('Requires-Dist')
  assert not [r for r in requires if '==' in r.split(';')[0]], 'exact pins belong in constraints.txt'
  assert {'plots', 'onednn', 'hear', 'cuda', 'test'} <= set(metadata.get_all('Provides-Extra'))
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
def test_configs_load_by_import_and_by_path_under_both_names(name):
  import importlib
  by_import = importlib.import_module(f'dem_jax.configs.{name}').get_config()
  assert by_import.to_dict() == importlib.import_module(f'configs.{name}').get_config().to_dict()
  for path in (f'configs/{name}.py', f'dem_jax/configs/{name}.py'):
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file('config', None, flag_values=flag_values)
    flag_values(['prog', f'--config={os.path.join(ROOT, path)}'])
    assert flag_values.config.to_dict() == by_import.to_dict(), path


def test_preprocessing_job_under_the_dem_jax_name():
  from dem_jax import preprocess as dem_jax_preprocess
  from preprocess import job
  assert dem_jax_preprocess.job.run is job.run


def test_cli_offers_the_subcommands_of_launch_sh():
  with open(os.path.join(ROOT, 'launch.sh')) as f:
    launch_commands = set(re.findall(r'^    ([a-z_]+)\)', f.read(), re.M))
  assert set(cli.COMMANDS) == launch_commands - {'setup', 'test'}


def test_cli_sets_cpu_malloc_only_for_xla_on_the_cpu():
  cpu = cli.cpu_malloc_environment('train', [], {}, gpu=False)
  assert cpu['MALLOC_ARENA_MAX'] == '1'
  assert 'MALLOC_ARENA_MAX' not in cli.cpu_malloc_environment('train', [], {}, gpu=True)
  assert 'MALLOC_ARENA_MAX' not in cli.cpu_malloc_environment('preprocess', [], {}, gpu=False)
  assert 'MALLOC_ARENA_MAX' not in cli.cpu_malloc_environment('bench', ['preprocess'], {}, gpu=False)
  assert cli.cpu_malloc_environment('embed', [], {'MALLOC_ARENA_MAX': '4'}, gpu=False)['MALLOC_ARENA_MAX'] == '4'


def test_cli_runs_the_subcommand_and_rejects_unknown_ones():
  dem_jax = os.path.join(os.path.dirname(sys.executable), 'dem-jax')
  result = subprocess.run([dem_jax, 'bench'], capture_output=True, text=True, timeout=60)
  assert result.returncode != 0 and 'usage: python -m dem_jax.bench' in result.stderr
  result = subprocess.run([dem_jax, 'trian'], capture_output=True, text=True, timeout=60)
  assert result.returncode != 0 and "unknown command 'trian'" in result.stderr


def test_library_modules_define_no_flags_and_command_mains_import():
  script = ('import dem_jax.embed, dem_jax.evaluate, dem_jax.hear, dem_jax.cli\n'
            'from absl import flags\n'
            "assert 'workdir' not in flags.FLAGS, 'a library module defined flags'\n"
            'from dem_jax.commands.embed import main\n'
            "assert 'workdir' in flags.FLAGS and callable(main)\n")
  result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert result.returncode == 0, result.stderr[-2000:]

"""launch.sh's environment handling, run against a stand-in Python that records how it was called.

The stand-in creates a 'venv' (a copy of itself) and answers every pip call at once, so these tests take
milliseconds and never touch the network or the real .venv.
"""

import os
import re
import shutil
import subprocess
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTALL_INPUTS = ('launch.sh', 'setup.cfg', 'pyproject.toml', 'constraints.txt')

FAKE_PYTHON = textwrap.dedent("""\
    #!/usr/bin/env bash
    echo "$* |MALLOC_ARENA_MAX=${MALLOC_ARENA_MAX:-}" >> "$FAKE_CALLS"
    if [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin" && cp "$0" "$3/bin/python"; fi
    if [ "$1 $2 $3" = "-m pip install" ]; then sleep "${FAKE_PIP_SECONDS:-0}"; fi
    exit 0
    """)


class Checkout:
  """A copy of the install inputs and launch.sh in a temporary folder, with the stand-in Python."""

  def __init__(self, path):
    self.root = str(path)
    for name in INSTALL_INPUTS:
      shutil.copy(os.path.join(ROOT, name), os.path.join(self.root, name))
    shutil.copytree(os.path.join(ROOT, 'dem_jax', 'commands'), os.path.join(self.root, 'dem_jax', 'commands'))
    self.python = os.path.join(self.root, 'fake_python')
    with open(self.python, 'w') as f:
      f.write(FAKE_PYTHON)
    os.chmod(self.python, 0o755)
    self.calls_path = os.path.join(self.root, 'calls.txt')
    self.env = {k: v for k, v in os.environ.items() if not k.startswith(('MALLOC_', 'DEM_JAX_'))}
    self.env.update(DEM_JAX_PYTHON=self.python, FAKE_CALLS=self.calls_path, PYENV_ROOT=self.root)

  def start(self, *args, **env):
    return subprocess.Popen([os.path.join(self.root, 'launch.sh'), *args], env=self.env | env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

  def run(self, *args, **env):
    proc = self.start(*args, **env)
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out, err

  def calls(self) -> list[str]:
    """The stand-in's calls since the last look, then forgets them."""
    if not os.path.exists(self.calls_path):
      return []
    with open(self.calls_path) as f:
      lines = f.read().splitlines()
    os.remove(self.calls_path)
    return lines


def installs(calls):
  return [c for c in calls if c.startswith('-m pip install') and ' -e ' in c]


@pytest.fixture
def checkout(tmp_path):
  return Checkout(tmp_path)


def test_gpu_setup_is_remembered_and_current_environment_runs_no_pip(checkout):
  assert checkout.run('setup', '--gpu')[0] == 0
  (install,) = installs(checkout.calls())
  assert f'-c {checkout.root}/constraints.txt' in install
  assert re.search(r'\[[a-z,]*cuda[a-z,]*\]', install), install
  for command in ('train', 'evaluate', 'embed', 'test', 'setup'):
    assert checkout.run(command, *([] if command == 'setup' else ['--flag=1']))[0] == 0
    calls = checkout.calls()
    assert not [c for c in calls if 'pip' in c or 'venv' in c], (command, calls)
  assert checkout.run('bench', 'train_step')[0] == 0
  assert checkout.calls() == ['-m dem_jax bench train_step |MALLOC_ARENA_MAX=']


def test_every_command_of_the_dispatcher_goes_to_it_unchanged(checkout):
  checkout.run('setup')
  checkout.calls()
  commands = sorted(n[:-3] for n in os.listdir(os.path.join(ROOT, 'dem_jax', 'commands'))
                    if n.endswith('.py') and not n.startswith('_'))
  assert {'train', 'preprocess', 'sample_data', 'demo', 'bench'} <= set(commands)
  for command in commands:
    assert checkout.run(command, '--x=1', 'two words')[0] == 0
    # The malloc settings are the dispatcher's (dem_jax.process), not the launcher's.
    assert checkout.calls() == [f'-m dem_jax {command} --x=1 two words |MALLOC_ARENA_MAX=']


def test_changed_install_inputs_reinstall_with_the_remembered_gpu_extra(checkout):
  checkout.run('setup', '--gpu')
  checkout.calls()
  with open(os.path.join(checkout.root, 'constraints.txt'), 'a') as f:
    f.write('# changed\n')
  checkout.run('train')
  calls = checkout.calls()
  (install,) = installs(calls)
  assert 'cuda' in install
  assert not [c for c in calls if '-m venv' in c]
  assert calls[-1] == '-m dem_jax train |MALLOC_ARENA_MAX='


def test_setup_cpu_switches_a_gpu_environment_back(checkout):
  checkout.run('setup', '--gpu')
  checkout.run('setup', '--cpu')
  first, second = installs(checkout.calls())
  assert 'cuda' in first and 'cuda' not in second
  checkout.run('train')
  assert checkout.calls() == ['-m dem_jax train |MALLOC_ARENA_MAX=']


def test_processes_started_at_once_install_once(checkout):
  procs = [checkout.start('train', FAKE_PIP_SECONDS='1') for _ in range(4)]
  assert [p.wait(timeout=60) for p in procs] == [0] * 4
  calls = checkout.calls()
  assert len(installs(calls)) == 1
  assert len([c for c in calls if '-m venv' in c]) == 1
  assert len([c for c in calls if c.startswith('-m dem_jax train')]) == 4


def test_help_prints_only_help(checkout):
  rc, out, err = checkout.run('help')
  assert rc == 0 and err == ''
  assert out.startswith('dem_jax launcher')
  assert 'set -euo' not in out and '#' not in out
  assert './launch.sh setup --gpu' in out
  assert not os.path.exists(os.path.join(checkout.root, '.venv'))
  assert checkout.calls() == []


def test_unknown_command_and_setup_flag_fail_with_the_fix(checkout):
  rc, _, err = checkout.run('trian')
  assert rc == 2 and "unknown command 'trian'" in err and './launch.sh help' in err
  assert checkout.calls() == []  # a mistyped command installs nothing
  rc, _, err = checkout.run('setup', '--cuda')
  assert rc == 2 and '--gpu or --cpu' in err

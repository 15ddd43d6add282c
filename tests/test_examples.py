"""Every script in python_examples/ runs to the end as a user would run it (python FILE from the
repository root), so an API change that breaks a copied example fails here."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "python_examples")
SLOW = {"compile_noisy_model.py"}  # inductor's code generation: about a minute on 2 cores


@pytest.mark.parametrize("name", [pytest.param(f, marks=pytest.mark.slow) if f in SLOW else f
                                  for f in sorted(os.listdir(EXAMPLES)) if f.endswith(".py")])
def test_example_runs(name, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, os.path.join(EXAMPLES, name)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"

"""The library without its extras: a training environment gets the training stack, not
JupyterLab, Django or math-verify, and the CLI runs there (issue 29, item 3)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
EXTRAS_ONLY = (
    "matplotlib",
    "ipywidgets",
    "jupyterlab",
    "ipykernel",
    "nbformat",
    "nbclient",
    "papermill",
    "django",
    "math-verify",
    "jupytext",
    "trl",
    "deepspeed",
    "tensorboard",
    "playwright",
)
BLOCKED_MODULES = (
    "matplotlib",
    "IPython",
    "ipywidgets",
    "ipykernel",
    "jupyterlab",
    "jupyter_server",
    "nbformat",
    "nbclient",
    "papermill",
    "django",
    "math_verify",
    "jupytext",
    "trl",
    "deepspeed",
    "tensorboard",
    "playwright",
)

SITECUSTOMIZE = f"""
import importlib.util, sys
BLOCKED = {BLOCKED_MODULES!r}
_find_spec = importlib.util.find_spec
def find_spec(name, package=None):
    return None if name.split(".")[0] in BLOCKED else _find_spec(name, package)
importlib.util.find_spec = find_spec
class _Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not installed here)")
        return None
sys.meta_path.insert(0, _Absent())
"""


def test_the_library_requires_the_training_stack_only():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {Requirement(r).name for r in project["dependencies"]}
    assert {"torch", "transformers", "accelerate", "peft", "datasets"} <= core
    assert not core & set(EXTRAS_ONLY), core & set(EXTRAS_ONLY)
    extras = project["optional-dependencies"]
    assert {"notebooks", "demo", "math", "tensorboard", "deepspeed", "all"} <= set(extras)
    assert {Requirement(r).name for r in extras["notebooks"]} >= {"matplotlib", "jupyterlab"}
    make = (ROOT / "Makefile").read_text()
    assert '-e ".[all,test]"' in make  # make setup: everything, at the tested pins


def _run(
    args: list[str], env_dir: Path, cwd: Path, python: tuple[str, ...] = ("-m", "scalebio_core")
) -> subprocess.CompletedProcess:
    """`python -m scalebio_core ARGS` (or `python PYTHON… ARGS`) with the extras blocked."""
    env_dir.mkdir(exist_ok=True)
    (env_dir / "sitecustomize.py").write_text(SITECUSTOMIZE)
    import os

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(env_dir), str(ROOT)])}
    return subprocess.run(
        [sys.executable, *python, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_the_cli_trains_without_notebooks_django_or_math_verify(tmp_path):
    """A smoke run, its resample and a fine-tuning, with every extra's package absent; the math
    grader, absent too, is refused before anything trains, naming the extra."""
    block = tmp_path / "block"
    run = tmp_path / "run"
    out = _run(
        ["train", "--config", "noisy", "--preset", "smoke", f"out_dir={run}", "steps=3"],
        block,
        tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert (run / "weights.json").exists()
    out = _run(["resample", "--run", str(run), "--n", "40"], block, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    data = run / "resampled.jsonl"
    sft = ["sft", "--data", str(data), "--config", "noisy", "--preset", "smoke", "steps=2"]
    out = _run([*sft, "--out", str(tmp_path / "ft"), "grader=math-verify"], block, tmp_path)
    assert out.returncode == 2 and "pip install 'scalebio_core[math]'" in out.stderr, out.stderr
    assert not (tmp_path / "ft" / "trajectory.jsonl").exists()  # refused before training
    out = _run([*sft, "--out", str(tmp_path / "ft")], block, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "ft" / "eval.json").exists()


TRAINER_STEP = """
import datasets
from scalebio_core.sources.corpora import build_corpus
from scalebio_core.train.hf_trainer import ScaleBiOConfig, ScaleBiOTrainer

corpus = build_corpus("noisy", n_per_source=12, n_val=8)
sources = {n: datasets.Dataset.from_list(r) for n, r in corpus.sources.items()}
args = ScaleBiOConfig(output_dir="hf", max_steps=2, per_device_train_batch_size=6,
                      max_length=64, save_strategy="no", use_cpu=True, disable_tqdm=True)
target = datasets.Dataset.from_list(corpus.validation)
trainer = ScaleBiOTrainer("embedded:nano", args, sources, target)
trainer.train()
print(len(trainer.history), sorted(trainer.weights))
"""


def test_a_trainer_step_runs_without_the_extras(tmp_path):
    out = _run(["-c", TRAINER_STEP], tmp_path / "block", tmp_path, python=())
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1].startswith("2 ["), out.stdout[-500:]
    assert (tmp_path / "hf" / "weights.json").is_file()

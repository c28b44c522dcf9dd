"""The library without its extras: a training environment gets the training stack, not
JupyterLab, Django or math-verify, and the CLI and the Trainer run there. The tests install the
package into a fresh venv, as a practitioner's training environment would get it."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
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


def test_the_library_requires_the_training_stack_only():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {Requirement(r).name for r in project["dependencies"]}
    assert {"torch", "transformers", "accelerate", "peft", "datasets"} <= core
    assert not core & set(EXTRAS_ONLY), core & set(EXTRAS_ONLY)
    extras = project["optional-dependencies"]
    assert {"notebooks", "demo", "math", "tensorboard", "deepspeed", "all"} <= set(extras)
    assert {Requirement(r).name for r in extras["notebooks"]} >= {"matplotlib", "jupyterlab"}
    # the wheel's package list names every package of the tree, and configs/ inside it
    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "scalebio_core").rglob("__init__.py")
    }
    assert set(listed["packages"]) == on_disk | {"scalebio_core.configs"}
    assert listed["package-dir"] == {"scalebio_core.configs": "configs"}
    make = (ROOT / "Makefile").read_text()
    assert '-e ".[all,test]"' in make  # make setup: everything, at the tested pins


def _tree(dest: Path) -> Path:
    """The project's tracked files (git ls-files where there is a .git; else the tree less its
    builds), so that `pip install` writes its build/ and egg-info into a copy, not the checkout."""
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    if listed.returncode == 0 and listed.stdout:
        for name in listed.stdout.split("\0"):
            if name and (ROOT / name).is_file() and not name.startswith(("notebooks/", "figures/")):
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, dest / name)
    else:
        skip = shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__", "notebooks")
        shutil.copytree(ROOT, dest, ignore=skip, dirs_exist_ok=True)
    return dest


def _pip(python: Path, *args: str) -> None:
    out = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert out.returncode == 0, f"pip install {' '.join(args)} failed:\n{out.stderr[-3000:]}"


@pytest.fixture(scope="module")
def lean(tmp_path_factory) -> Path:
    """A fresh venv holding torch (the version of this one, from TORCH_INDEX when set, as
    `make setup` installs it) and then `pip install .` without extras, under the pins. Returns
    its python. Installs from the package index or the local wheels and pip cache."""
    root = tmp_path_factory.mktemp("lean")
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True, timeout=300)
    python = root / "venv" / "bin" / "python"
    index = os.environ.get("TORCH_INDEX")
    torch = f"torch=={importlib.metadata.version('torch').split('+')[0]}"
    _pip(python, *(["--index-url", index] if index else []), torch)
    _pip(python, "-c", str(ROOT / "constraints.txt"), str(_tree(root / "src")))
    return python


def _run(
    python: Path, args: list[str], cwd: Path, module: tuple[str, ...] = ("-m", "scalebio_core")
) -> subprocess.CompletedProcess:
    """`python -m scalebio_core ARGS` (or `python ARGS`) in the lean venv, outside the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env |= {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(
        [str(python), *module, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_pip_install_pulls_no_notebook_server_django_or_math_verify(lean):
    listed = subprocess.run(
        [str(lean), "-m", "pip", "list", "--format=json"], capture_output=True, text=True
    )
    names = {d["name"].lower().replace("_", "-") for d in json.loads(listed.stdout)}
    assert {"torch", "transformers", "accelerate", "peft", "datasets", "scalebio-core"} <= names
    unwanted = set(EXTRAS_ONLY) | {"notebook", "jupyter-server", "ipython", "jupyter-client"}
    assert not names & unwanted, names & unwanted
    where = subprocess.run(
        [str(lean), "-c", "import scalebio_core, sys; print(scalebio_core.__file__)"],
        cwd=lean.parent,
        capture_output=True,
        text=True,
    )
    assert "site-packages" in where.stdout, where  # the installed copy, not the checkout


def test_the_cli_trains_without_notebooks_django_or_math_verify(lean, tmp_path):
    """A smoke run (its preset found inside the installed package), its resample and a
    fine-tuning; the math grader, not installed, is refused before anything trains, naming the
    extra."""
    run = tmp_path / "run"
    out = _run(
        lean,
        ["train", "--config", "noisy", "--preset", "smoke", f"out_dir={run}", "steps=3"],
        tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert (run / "weights.json").exists()
    out = _run(lean, ["resample", "--run", str(run), "--n", "40"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    data = run / "resampled.jsonl"
    sft = ["sft", "--data", str(data), "--config", "noisy", "--preset", "smoke", "steps=2"]
    out = _run(lean, [*sft, "--out", str(tmp_path / "ft"), "grader=math-verify"], tmp_path)
    assert out.returncode == 2 and "pip install 'scalebio_core[math]'" in out.stderr, out.stderr
    assert not (tmp_path / "ft" / "trajectory.jsonl").exists()  # refused before training
    out = _run(lean, [*sft, "--out", str(tmp_path / "ft")], tmp_path)
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


def test_a_trainer_step_runs_without_the_extras(lean, tmp_path):
    out = _run(lean, ["-c", TRAINER_STEP], tmp_path, module=())
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1].startswith("2 ["), out.stdout[-500:]
    assert (tmp_path / "hf" / "weights.json").is_file()

"""pyproject.toml states ranges; constraints.txt, environment.yml and the Makefile the tested pins;
the ranges keep a user's own torch; notebooks are clean."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pip
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent


def _requirements() -> list[str]:
    """pyproject.toml's requirements: the package's and its extras' (`all` names the others;
    `peers` is installed by `make peers` with its own pins)."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = data["project"]["optional-dependencies"]
    named = [r for k, v in extras.items() if k not in ("all", "peers") for r in v]
    return data["project"]["dependencies"] + sorted(set(named), key=named.index)


def _pins() -> set[str]:
    """constraints.txt: the exact versions tested here."""
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return {x.strip() for x in lines if x.strip() and not x.startswith("#")}


def test_environment_yml_matches_the_constraints():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    pins = {p for p in pip if not p.startswith("-e")}
    assert pins == _pins()
    assert "python=3.11" in env["dependencies"]


def test_pyproject_states_ranges_the_pins_satisfy_and_the_makefile_installs_the_pins():
    pins = {Requirement(p).name: Requirement(p) for p in _pins()}
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[0-9][\w.]*", str(p)) for p in pins.values())
    for text in _requirements():
        req = Requirement(text)
        assert not any(s.operator == "==" for s in req.specifier), f"{text}: a range, not a pin"
        version = next(iter(pins[req.name].specifier)).version
        assert req.specifier.contains(version), f"{text} excludes the tested {version}"
    assert set(pins) == {Requirement(t).name for t in _requirements()}
    make = (ROOT / "Makefile").read_text()
    torch_pin = re.search(r"^TORCH\s*:=\s*(\S+)", make, re.M).group(1)
    assert torch_pin in _pins() and "-c constraints.txt" in make


def _dry_run(venv: Path, requirements: list[str], tmp: Path) -> tuple[int, list]:
    """pip's resolver on `requirements` in `venv`, offline: (exit code, what it would install)."""
    (tmp / "req.txt").write_text("\n".join(requirements) + "\n")
    report = tmp / "report.json"
    report.unlink(missing_ok=True)
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "--isolated", "install", "--dry-run",
         "--no-index", "--report", str(report), "-r", str(tmp / "req.txt")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    installs = json.loads(report.read_text())["install"] if report.exists() else []
    return out.returncode, [(i["metadata"]["name"], i["metadata"]["version"]) for i in installs]


def test_installing_into_an_environment_with_another_allowed_torch_keeps_it(tmp_path):
    """An environment with its own torch (2.14.0 here) and the other packages at their tested
    versions, as installed metadata: pip's resolver, offline, installs nothing for the package's
    requirements. The old exact pin, as a control, would have to replace that torch."""
    venv = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    for pin in sorted(_pins() - {p for p in _pins() if p.startswith("torch==")}) + [
        "torch==2.14.0"
    ]:
        name, version = pin.split("==")
        info = site / f"{re.sub(r'[-_.]+', '_', name)}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        (info / "RECORD").write_text("")
    (site / "_pip.pth").write_text(str(Path(pip.__file__).parent.parent) + "\n")  # pip, not a dist
    code, installs = _dry_run(venv, _requirements(), tmp_path)
    assert code == 0 and installs == [], installs
    code, installs = _dry_run(venv, ["torch==2.13.0"], tmp_path)
    assert code != 0 or ("torch", "2.13.0") in installs


def test_ci_calls_make_test():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make reproduce" in readme


def test_notebooks_committed_without_outputs_and_with_parameters():
    notebooks = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert notebooks
    for nb_path in notebooks:
        nb = json.loads(nb_path.read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), nb_path
        params = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(params) == 1, f"{nb_path.name}: needs exactly one 'parameters' cell"
        src = "".join(params[0]["source"])
        assert 'PRESET = "quick"' in src and "SEED" in src, nb_path.name

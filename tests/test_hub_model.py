"""Pinned hub models load from one local snapshot directory of the HF cache, offline (CPU).

The cache is a temporary directory in the huggingface_hub layout
(models--<org>--<name>/snapshots/<commit>/, refs/main) holding a tiny model built here.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import constants
from transformers import TrainerCallback

from cppo import hub
from cppo.pipeline import jobs
from cppo.run import directory as runs
from cppo.run.config import RunConfigError, validate_run_config
from cppo.training.run import run_training
from evaluation.testing import make_tiny_model, write_train_jsonl

torch.set_num_threads(1)

HUB_ID = "tiny-org/tiny-model"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER = "fedcba9876543210fedcba9876543210fedcba98"


def make_cache(root):
    """An HF hub cache holding HUB_ID at COMMIT (also the cached `main`)."""
    repo = root / "hub" / "models--tiny-org--tiny-model"
    snapshot = repo / "snapshots" / COMMIT
    make_tiny_model(snapshot, hidden_size=32, num_hidden_layers=2)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return root / "hub", snapshot


@pytest.fixture
def cache(tmp_path, monkeypatch):
    hub_cache, snapshot = make_cache(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def no_network(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(hub, "download_snapshot", no_network)
    return hub_cache, snapshot


def test_cached_snapshot_is_the_commit_directory(cache):
    hub_cache, snapshot = cache
    assert hub.cached_snapshot(HUB_ID, COMMIT) == snapshot
    assert hub.cached_snapshot(HUB_ID, None) == snapshot  # refs/main
    resolved = hub.resolve_model(HUB_ID, COMMIT)
    assert resolved.path == snapshot and resolved.commit == COMMIT
    assert resolved.provenance() == {
        "path": str(snapshot),
        "hub_id": HUB_ID,
        "revision": COMMIT,
        "commit": COMMIT,
    }


def test_missing_snapshot_names_the_model_and_the_cache(cache):
    hub_cache, _ = cache
    with pytest.raises(hub.ModelNotCachedError) as err:
        hub.resolve_model(HUB_ID, OTHER)  # offline: no download
    msg = str(err.value)
    assert f"{HUB_ID}@{OTHER}" in msg and str(hub_cache) in msg and "prefetch" in msg


def test_download_when_missing_and_online(cache, monkeypatch):
    hub_cache, snapshot = cache
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    calls = []

    def fake_download(hub_id, revision):
        calls.append((hub_id, revision))
        return snapshot

    monkeypatch.setattr(hub, "download_snapshot", fake_download)
    assert hub.resolve_model(HUB_ID, OTHER).path == snapshot
    assert calls == [(HUB_ID, OTHER)]
    with pytest.raises(hub.ModelNotCachedError):
        hub.resolve_model(HUB_ID, OTHER, download=False)


def test_local_directory_with_a_revision_is_an_error(tmp_path):
    model = tmp_path / "m"
    make_tiny_model(model, hidden_size=32, num_hidden_layers=2)
    assert hub.resolve_model(str(model), None).path == model
    with pytest.raises(ValueError, match="'model_revision'.*local directory"):
        hub.resolve_model(str(model), COMMIT)


def test_prefetch_marker_records_the_snapshot_directory(cache, tmp_path, monkeypatch):
    hub_cache, snapshot = cache
    out = tmp_path / "models" / "tiny.hub.json"
    info = jobs.prefetch_model(HUB_ID, COMMIT, out)  # cached: no download
    want = {
        "id": HUB_ID,
        "revision": COMMIT,
        "commit": COMMIT,
        "path": str(snapshot),
        "hub_cache": str(hub_cache),
    }
    assert info == want and json.loads(out.read_text()) == want

    # not cached: downloaded, then found by the trainer's own look-up
    def fake_download(hub_id, revision):
        _, snap = make_cache(tmp_path / "downloaded")
        target = hub_cache / "models--tiny-org--other" / "snapshots" / revision
        target.parent.mkdir(parents=True)
        snap.rename(target)
        return target

    monkeypatch.setattr(hub, "download_snapshot", fake_download)
    info = jobs.prefetch_model("tiny-org/other", OTHER, out)
    assert info["path"] == str(hub_cache / "models--tiny-org--other" / "snapshots" / OTHER)
    assert info["commit"] == OTHER


def test_engine_follows_the_policy_directory():
    # TRL builds the colocated vLLM engine from the policy's name_or_path, so loading the policy
    # from the snapshot directory pins the engine's config, tokenizer and weights too
    from trl.generation import vllm_generation

    src = inspect.getsource(vllm_generation)
    assert "model=model.name_or_path," in src


def _run_config(tmp_path, data):
    return {
        "output_dir": str(tmp_path / "run"),
        "model": HUB_ID,
        "model_revision": COMMIT,
        "train_data": str(data),
        "method": {"rule": "cppo"},
        "schedule": {
            "prompts_per_iter": 4,
            "n": 4,
            "minibatch": 2,
            "updates_per_iter": 2,
            "iterations": 1,
            "max_completion_length": 8,
            "micro_batch": 8,
        },
    }


class Loaded(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kw):
        self.model_dir = model.name_or_path
        self.tokenizer_dir = processing_class.name_or_path


def parity_reward(prompts, completions, completion_ids, **kwargs):
    return [1.0 if ids[0] % 2 == 0 else -1.0 for ids in completion_ids]


def test_run_loads_policy_and_tokenizer_from_the_snapshot(cache, tmp_path):
    _, snapshot = cache
    data = write_train_jsonl(tmp_path / "train.jsonl", 4)
    cfg = validate_run_config(_run_config(tmp_path, data))
    probe = Loaded()
    run = run_training(cfg, callbacks=[probe], reward_funcs=[parity_reward], progress=False)
    assert probe.model_dir == probe.tokenizer_dir == str(snapshot)
    done = json.loads((run / "DONE").read_text())
    assert done["model"] == {
        "path": str(snapshot),
        "hub_id": HUB_ID,
        "revision": COMMIT,
        "commit": COMMIT,
    }
    # run.yaml's record stays machine-independent: the hub id and the pinned commit
    resolved = yaml.safe_load((run / "config.resolved.yaml").read_text())
    assert (resolved["model"], resolved["model_revision"]) == (HUB_ID, COMMIT)

    # a revision that is not cached fails before training, naming what to prefetch
    other = validate_run_config({**_run_config(tmp_path, data), "model_revision": OTHER})
    other["output_dir"] = str(tmp_path / "other")
    with pytest.raises(hub.ModelNotCachedError, match=OTHER):
        run_training(other, reward_funcs=[parity_reward], progress=False)
    local = validate_run_config(
        {**_run_config(tmp_path, data), "model": str(snapshot), "output_dir": str(tmp_path / "l")}
    )
    with pytest.raises(RunConfigError, match="model_revision"):
        run_training(local, reward_funcs=[parity_reward], progress=False)


def test_each_node_downloads_the_model_on_its_first_process_first(monkeypatch):
    # the first process of node 2 (global rank 8): with a node-local cache it must download at
    # once while its node's other processes wait, not wait for the global main process
    import accelerate

    from cppo.training import run as run_module

    events = []

    class FirstOnNode2:
        is_main_process = False
        is_local_main_process = True
        _goes_first = accelerate.PartialState._goes_first
        main_process_first = accelerate.PartialState.main_process_first
        local_main_process_first = accelerate.PartialState.local_main_process_first

        def wait_for_everyone(self):
            events.append("wait")

    def resolve(model, revision):
        events.append("download")
        return hub.ResolvedModel(Path(model), model, revision, revision)

    monkeypatch.setattr(accelerate, "PartialState", FirstOnNode2)
    monkeypatch.setattr(run_module, "resolve_model", resolve)
    resolved = run_module.resolve_run_model({"model": HUB_ID, "model_revision": COMMIT})
    assert resolved.hub_id == HUB_ID
    assert events == ["download", "wait"]  # first, then releases the node's others


def test_selection_of_step_0_uses_the_cached_snapshot(cache, tmp_path):
    _, snapshot = cache
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    recs = [
        {"kind": "validation", "step": 0, "val/mean": 0.9},
        {"kind": "validation", "step": 2, "val/mean": 0.5},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    sel = runs.select_checkpoints(run, 2, HUB_ID, COMMIT)
    assert sel["best"] == {"step": 0, "val_mean": 0.9, "path": str(snapshot)}
    # not cached here: the hub id and revision, for the evaluation to resolve
    sel = runs.select_checkpoints(run, 2, HUB_ID, OTHER)
    assert sel["best"] == {"step": 0, "val_mean": 0.9, "path": HUB_ID, "revision": OTHER}


@pytest.mark.slow
def test_cli_trains_offline_from_the_cache(tmp_path):
    """The real environment switches: HF_HOME / HF_HUB_CACHE and HF_HUB_OFFLINE=1."""
    hub_cache, snapshot = make_cache(tmp_path)
    data = write_train_jsonl(tmp_path / "train.jsonl", 4)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(_run_config(tmp_path, data)))
    env = dict(
        os.environ,
        HF_HOME=str(tmp_path / "hf-home"),
        HF_HUB_CACHE=str(hub_cache),
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
    )
    res = subprocess.run(
        [sys.executable, "-m", "cppo.train", "--config", "run.yaml", "--no-progress"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    done = json.loads((tmp_path / "run" / "DONE").read_text())
    assert done["model"]["path"] == str(snapshot) and done["model"]["commit"] == COMMIT

"""The checkpoint protocol of ``simulations/results.py`` under injected faults, and the start-of-run refusals.

- A crash (an exception standing for a kill) at every single step of a checkpoint write: every write
  (torn: half the bytes), fsync, rename, mkdir, unlink and rmtree (partial). After each, a fresh reader
  loads a complete checkpoint equal to the previous or the new one, and the next save works.
- The order of the durable steps (files fsync'ed before the rename, the manifest last, the directory
  fsync'ed, the pointer switched atomically, the previous version deleted only after the switch).
- A corrupt file in the newest version falls back to the previous one; a corrupt or missing pointer falls
  back to the newest complete version; a corrupt only version refuses.
- ``resume=true`` without a checkpoint, or with one of other settings, refuses naming the run dir or each
  difference; a run name already used refuses unless ``overwrite=true``.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedlora.run_config import RESUME_MAY_CHANGE, ConfigError, RunConfig, parse_run_config, resume_differences
from simulations.results import CheckpointError, CheckpointStore, RunOutputs


class Crash(BaseException):
    """Stands for the process being killed at that instant (BaseException: no ``except Exception`` in the
    code under test can swallow it, as nothing can catch SIGKILL)."""


def _state(rnd: int, seed: int) -> dict:
    """A strategy state_dict of round ``rnd`` (the store does not look inside)."""
    rng = np.random.default_rng(seed)
    return {"format": "fedlora.strategy/1", "strategy": "fedsb", "round": rnd,
            "global_state": {"l0.R0": rng.standard_normal((4, 4)), "head.weight": rng.standard_normal((2, 3))},
            "rng": np.random.default_rng(seed).bit_generator.state, "history": [{"round": r} for r in range(rnd)],
            "user-dp": {"accountant": {"history": [[0.7, 0.5, rnd]]}, "rng": {"state": 2**100 + seed}}}


def _extra(cfg: RunConfig | None = None) -> dict:
    return {"cumulative-bytes": 10.0, "elapsed-seconds": 1.5, "run-config": (cfg or RunConfig()).to_dict(),
            "fingerprint": "f" * 64}


def _same(a: dict, b: dict) -> bool:
    ga, gb = a["global_state"], b["global_state"]
    rest_a, rest_b = ({k: v for k, v in x.items() if k != "global_state"} for x in (a, b))
    return (a["round"] == b["round"] and list(ga) == list(gb) and rest_a == rest_b
            and all(ga[k].dtype == gb[k].dtype and ga[k].tobytes() == gb[k].tobytes() for k in ga))


# ------------------------------------------------------------------------------------------ fault injection
@contextlib.contextmanager
def crash_at(step: int | None) -> Iterator[list]:
    """Count every filesystem step (``write`` of a file opened for writing, ``fsync``, ``replace``,
    ``rename``, ``mkdir``, ``unlink``, ``rmtree``) and raise :class:`Crash` at number ``step`` (0-based;
    None: never). A crashing write writes half its bytes first (a torn file); a crashing rmtree removes one
    file first (a half-deleted directory). Yields the list of steps taken as ``(kind, path)``."""
    taken: list = []
    real = {"fsync": os.fsync, "replace": os.replace, "rename": os.rename, "mkdir": os.mkdir,
            "unlink": os.unlink, "rmtree": shutil.rmtree, "open": pathlib.Path.open}

    def tick(kind: str, path) -> bool:
        taken.append((kind, str(path)))
        return step is not None and len(taken) - 1 == step

    def fd_path(fd: int) -> str:
        return os.readlink(f"/proc/self/fd/{fd}")

    def fsync(fd):
        if tick("fsync", fd_path(fd)):
            raise Crash
        return real["fsync"](fd)

    def simple(kind):
        def call(path, *args, **kwargs):
            if tick(kind, path):
                raise Crash
            return real[kind](path, *args, **kwargs)
        return call

    def rmtree(path, *args, **kwargs):
        if tick("rmtree", path):
            files = [p for p in Path(path).rglob("*") if p.is_file()]
            if files:
                real["unlink"](files[0])
            raise Crash
        return real["rmtree"](path, *args, **kwargs)

    class TornFile:
        def __init__(self, fh, path):
            self.fh, self.path = fh, path

        def write(self, data):
            if tick("write", self.path):
                self.fh.write(data[: len(data) // 2])
                self.fh.flush()
                raise Crash
            return self.fh.write(data)

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.fh.__exit__(*exc)

    def open_(self, mode="r", *args, **kwargs):
        fh = real["open"](self, mode, *args, **kwargs)
        return TornFile(fh, self) if any(c in mode for c in "wax") else fh

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "fsync", fsync)
        mp.setattr(os, "replace", simple("replace"))
        mp.setattr(os, "rename", simple("rename"))
        mp.setattr(os, "mkdir", simple("mkdir"))
        mp.setattr(os, "unlink", simple("unlink"))
        mp.setattr(shutil, "rmtree", rmtree)
        mp.setattr(pathlib.Path, "open", open_)
        yield taken


def test_a_crash_at_every_step_of_a_checkpoint_write_leaves_the_previous_or_the_new_one(tmp_path):
    a, b, c = _state(1, 1), _state(2, 2), _state(3, 3)
    with crash_at(None) as steps:  # a dry run counts the steps of one save
        RunOutputs(tmp_path / "dry").save_checkpoint(a, _extra())
        del steps[:]
        RunOutputs(tmp_path / "dry").save_checkpoint(b, _extra())
    total = len(steps)
    kinds = {k for k, _ in steps}
    assert total >= 15 and {"write", "fsync", "replace", "rmtree"} <= kinds, steps

    loaded_rounds = []
    for k in range(total + 1):
        run = tmp_path / f"k{k}"
        RunOutputs(run).save_checkpoint(a, _extra())
        crashed = False
        try:
            with crash_at(k):
                RunOutputs(run).save_checkpoint(b, _extra())
        except Crash:
            crashed = True
        assert crashed == (k < total), k
        got = RunOutputs(run).read_checkpoint()  # a new process
        assert _same(got.state, a) or _same(got.state, b), (k, steps[k] if k < total else None)
        loaded_rounds.append(got.round)
        # the next save cleans up whatever the crash left and becomes the only version
        RunOutputs(run).save_checkpoint(c, _extra())
        assert _same(RunOutputs(run).read_checkpoint().state, c), k
        assert sorted(p.name for p in (run / "checkpoint").iterdir()) == ["LATEST", "round-000003"], k
    # both outcomes occur: the crashes before the pointer switch keep a, those after it give b
    assert 1 in loaded_rounds and 2 in loaded_rounds and loaded_rounds[-1] == 2
    assert loaded_rounds == sorted(loaded_rounds)


def test_durable_steps_come_in_the_right_order(tmp_path):
    out = RunOutputs(tmp_path)
    out.save_checkpoint(_state(1, 1), _extra())
    with crash_at(None) as steps:
        out.save_checkpoint(_state(2, 2), _extra())
    ck = tmp_path / "checkpoint"
    tmp, final, old = str(ck / "round-000002.tmp"), str(ck / "round-000002"), str(ck / "round-000001")

    def first(kind, path):
        return steps.index((kind, path))

    rename = next(i for i, (kind, p) in enumerate(steps) if kind == "replace" and p == tmp)
    written = [p for kind, p in steps if kind == "write" and p.startswith(tmp + "/")]
    assert written[-1] == tmp + "/MANIFEST.json" and len(written) >= 5, written
    for path in written:  # every file, the manifest included, fsync'ed before the directory is renamed
        assert first("write", path) < first("fsync", path) < rename, path
    assert first("fsync", tmp) < rename  # the new directory's entries
    pointer_tmp = str(ck / ".LATEST.tmp")
    switch = first("replace", pointer_tmp)
    dir_syncs = [i for i, s in enumerate(steps) if s == ("fsync", str(ck))]
    assert any(rename < i < first("write", pointer_tmp) for i in dir_syncs)  # the rename is on disk first
    assert first("fsync", pointer_tmp) < switch
    delete = first("rmtree", old)
    assert any(switch < i < delete for i in dir_syncs)  # the switch is on disk before the old one goes
    assert json.loads((ck / "round-000002" / "MANIFEST.json").read_text())["round"] == 2
    assert (ck / "LATEST").read_text() == "round-000002\n" and not Path(final + ".tmp").exists()


def _both_versions(tmp_path: Path) -> Path:
    """Both round 1 and round 2 complete, LATEST → round 2 (as a kill just before the old one's deletion leaves)."""
    for rnd in (1, 2):
        RunOutputs(tmp_path / f"r{rnd}").save_checkpoint(_state(rnd, rnd), _extra())
    ck = tmp_path / "run" / "checkpoint"
    ck.mkdir(parents=True)
    for rnd in (1, 2):
        shutil.copytree(tmp_path / f"r{rnd}" / "checkpoint" / f"round-00000{rnd}", ck / f"round-00000{rnd}")
    (ck / "LATEST").write_text("round-000002\n")
    return tmp_path / "run"


def test_a_corrupt_file_in_the_newest_version_falls_back_to_the_previous(tmp_path, caplog):
    run = _both_versions(tmp_path)
    assert RunOutputs(run).read_checkpoint().round == 2
    f = run / "checkpoint" / "round-000002" / "global_state.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 1  # one flipped bit in the last array value
    f.write_bytes(bytes(data))
    got = RunOutputs(run).read_checkpoint()
    assert got.round == 1 and _same(got.state, _state(1, 1))
    assert any("round-000002" in s and "sha256" in s for s in got.skipped), got.skipped
    assert "passed over round-000002" in caplog.text


def test_user_level_dp_refuses_to_resume_from_an_older_version_than_the_newest(tmp_path):
    from simulations.server_app import refuse_noise_reuse

    run = _both_versions(tmp_path)
    f = run / "checkpoint" / "round-000002" / "global_state.safetensors"
    f.write_bytes(f.read_bytes()[:-1] + bytes([f.read_bytes()[-1] ^ 1]))
    skipped = RunOutputs(run).read_checkpoint().skipped
    plain = parse_run_config({"results-dir": str(tmp_path), "run-name": "r"})
    refuse_noise_reuse(plain, skipped, run)  # without user-level DP the previous version is fine
    user_dp = parse_run_config({"results-dir": str(tmp_path), "run-name": "r", "user-dp-clip": 1.0,
                                "user-dp-noise": 1.0, "strategy": "fedsb"})
    refuse_noise_reuse(user_dp, [], run)  # the newest version itself is fine
    with pytest.raises(CheckpointError, match="reuse released noise"):
        refuse_noise_reuse(user_dp, skipped, run)


@pytest.mark.parametrize("pointer", [None, "garbage\x00", "round-000009", ""])
def test_a_missing_or_corrupt_pointer_falls_back_to_the_newest_complete_version(tmp_path, pointer):
    run = _both_versions(tmp_path)
    (run / "checkpoint" / "round-000003.tmp").mkdir()  # an unfinished write is never a candidate
    if pointer is None:
        (run / "checkpoint" / "LATEST").unlink()
    else:
        (run / "checkpoint" / "LATEST").write_text(pointer)
    got = RunOutputs(run).read_checkpoint()
    assert got.round == 2 and _same(got.state, _state(2, 2)) and got.skipped


def test_a_corrupt_only_version_or_an_old_pickle_checkpoint_is_refused(tmp_path):
    out = RunOutputs(tmp_path / "a")
    out.save_checkpoint(_state(1, 1), _extra())
    (tmp_path / "a" / "checkpoint" / "round-000001" / "strategy.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"no complete checkpoint in .*a/checkpoint.*strategy.json"):
        out.read_checkpoint()
    legacy = tmp_path / "b" / "checkpoint"
    legacy.mkdir(parents=True)
    (legacy / "strategy.json").write_text("{}")
    (legacy / "server.pkl").write_bytes(b"\x80\x04.")
    with pytest.raises(CheckpointError, match="older fedlora.*overwrite=true"):
        RunOutputs(tmp_path / "b").read_checkpoint()


def test_rng_states_and_extras_survive_exactly(tmp_path):
    import random

    import torch

    out = RunOutputs(tmp_path)
    random.seed(5), np.random.seed(6), torch.manual_seed(7)
    np.random.standard_normal()  # a cached Gaussian in numpy's legacy state
    out.save_checkpoint(_state(1, 1), _extra())
    expected = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    state, extra = out.load_checkpoint()
    assert (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()) == expected
    assert extra == _extra() and _same(state, _state(1, 1))


# ------------------------------------------------------------------------------------------ start-of-run refusals
def _cfg(tmp_path: Path, **kw) -> RunConfig:
    return parse_run_config({"results-dir": str(tmp_path), "run-name": "r", **kw})


def test_resume_without_a_checkpoint_refuses_naming_the_run_dir(tmp_path):
    out = RunOutputs(tmp_path / "r")
    out.append_metrics({"round": 0})
    with pytest.raises(ConfigError, match=rf"'resume': nothing to resume in {tmp_path / 'r'}"):
        out.prepare(_cfg(tmp_path, resume=True))
    assert out.read_metrics() == [{"round": 0}]  # nothing lost


def test_resume_with_other_settings_refuses_naming_each_difference(tmp_path):
    saved = _cfg(tmp_path, strategy="hetero", ranks="16,8,4", **{"dp-epsilon": 3.0})
    out = RunOutputs(tmp_path / "r")
    out.save_checkpoint(_state(2, 2), _extra(saved))
    changed = _cfg(tmp_path, strategy="hetero", ranks="16,8", seed=1, weighting="uniform", resume=True,
                   **{"dp-epsilon": 8.0, "dp-clip": 0.5})
    with pytest.raises(ConfigError, match="'resume'") as err:
        out.prepare(changed)
    msg = str(err.value)
    for key in ("'ranks': checkpoint has '16,8,4', now '16,8'", "'seed': checkpoint has 42, now 1", "'weighting'",
                "'dp-epsilon': checkpoint has 3.0, now 8.0", "'dp-clip'", str(tmp_path / "r"), "round-000002"):
        assert key in msg, (key, msg)
    assert "'strategy'" not in msg and "'resume'" not in msg.split("settings:")[1]
    # what may change on resume does not count
    ok = _cfg(tmp_path, strategy="hetero", ranks="16,8,4", resume=True,
              **{"dp-epsilon": 3.0, "num-server-rounds": 9, "round-timeout": 5.0, "results-dir": "/moved"})
    ckpt = out.prepare(ok)
    assert ckpt is not None and ckpt.round == 2 and _same(ckpt.state, _state(2, 2))
    with pytest.raises(ConfigError, match="'resume'.*fingerprint"):
        ckpt.require_fingerprint("e" * 64)
    ckpt.require_fingerprint("f" * 64)


def test_resume_differences_cover_every_key_but_the_allowed_ones():
    base = RunConfig()
    for key, value in base.to_dict().items():
        other = {**base.to_dict(), key: (not value) if isinstance(value, bool) else
                 value + 1 if isinstance(value, (int, float)) else value + "x"}
        diffs = resume_differences(other, base)
        assert (diffs == []) == (key in RESUME_MAY_CHANGE), (key, diffs)
        assert key in RESUME_MAY_CHANGE or diffs[0].startswith(f"{key!r}:"), diffs
    assert resume_differences({**base.to_dict(), "old-key": 1}, base) == [
        "'old-key': checkpoint has 1, not a run-config key any more"]
    assert resume_differences({}, base) == []  # absent = default


def test_a_used_run_name_is_not_overwritten_without_overwrite_true(tmp_path):
    run = tmp_path / "r"
    out = RunOutputs(run)
    out.append_metrics({"round": 0})
    out.save_checkpoint(_state(0, 0), _extra())
    (run / "run.log").write_text("the first run's log\n")
    with pytest.raises(ConfigError, match=r"'overwrite': .*r already holds a run \(a checkpoint in checkpoint/ and "
                                          r"metrics.jsonl with 1 rounds\).*resume=true.*overwrite=true"):
        out.prepare(_cfg(tmp_path))
    assert out.read_checkpoint().round == 0 and out.read_metrics() == [{"round": 0}]  # nothing lost
    assert out.prepare(_cfg(tmp_path, overwrite=True)) is None
    assert not (run / "checkpoint").exists() and out.read_metrics() == []
    assert (run / "run.log").read_text() == "the first run's log\n"  # scripts/run.sh appends to it
    assert RunOutputs(tmp_path / "fresh").prepare(_cfg(tmp_path, **{"run-name": "fresh"})) is None
    with pytest.raises(ConfigError, match="'overwrite'.*set one of them"):
        _cfg(tmp_path, resume=True, overwrite=True)


def test_a_store_refuses_file_names_it_could_not_keep(tmp_path):
    store = CheckpointStore(tmp_path / "c")
    for files in ({}, {"MANIFEST.json": b""}, {"a/b": b""}, {".hidden": b""}):
        with pytest.raises(ValueError, match="plain names"):
            store.save(1, files)
    assert not store.exists()


# ------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_round_0_is_checkpointed_and_a_run_killed_in_round_1_resumes_from_it(tmp_path, monkeypatch, capsys):
    """The real ServerApp (in process, 2 nodes): the initial global state is on disk before round 1 starts; a
    rerun under the same name refuses, a resume with another setting refuses naming it, and a resume
    continues from round 0."""
    from simulations import server_app
    from simulations.inprocess import run_in_process

    overrides = {"strategy": "fedsb", "num-server-rounds": 1, "num-partitions": 2, "fraction-train": 1.0,
                 "max-client-examples": 16, "max-test-examples": 16, "local-steps": 1, "eval-batch-size": 16,
                 "export-adapter": False, "results-dir": str(tmp_path), "run-name": "r0"}
    run_dir = tmp_path / "r0"
    seen = {}

    class Killed(Exception):
        pass

    def killed_before_round_1(grid, strategy, **kwargs):
        seen["checkpoint"] = RunOutputs(run_dir).read_checkpoint()
        seen["initial"] = {k: v.copy() for k, v in strategy.global_state.items()}
        raise Killed

    real_run_rounds = server_app.run_rounds
    monkeypatch.setattr(server_app, "run_rounds", killed_before_round_1)
    with pytest.raises(Killed):
        run_in_process(overrides, 2)
    monkeypatch.setattr(server_app, "run_rounds", real_run_rounds)
    ckpt = seen["checkpoint"]
    assert ckpt.round == 0 and ckpt.version == "round-000000"
    assert _same(ckpt.state, {**ckpt.state, "global_state": seen["initial"]})
    assert ckpt.server["run-config"]["run-name"] == "r0" and len(ckpt.server["fingerprint"]) == 64

    with pytest.raises(ConfigError, match="'overwrite'"):
        run_in_process(overrides, 2)
    with pytest.raises(ConfigError, match="'local-steps': checkpoint has 1, now 2"):
        run_in_process({**overrides, "resume": True, "local-steps": 2}, 2)
    capsys.readouterr()
    run_in_process({**overrides, "resume": True}, 2)
    assert f"resuming {run_dir} after round 0" in capsys.readouterr().out
    out = RunOutputs(run_dir)
    assert [r["round"] for r in out.read_metrics()] == [0, 1]
    final = out.read_checkpoint()
    assert final.round == 1 and final.version == "round-000001" and not final.skipped
    assert sorted(p.name for p in (run_dir / "checkpoint").iterdir()) == ["LATEST", "round-000001"]
    assert not _same(final.state, {**final.state, "global_state": seen["initial"]})  # round 1 moved it

"""Shared helpers: device choice, atomic writes, checkpoint errors.
Run: python -m pytest -q tests/test_common.py   (CPU, seconds)"""

import os
import re

import pytest
import torch

import common


def test_pick_device_names_what_is_wrong():
    assert common.pick_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown --device 'tpu'"):
        common.pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no cuda device"):
            common.pick_device("cuda")


def test_save_removes_abandoned_temp_files_and_only_those(tmp_path):
    path = tmp_path / "x.pt"
    for name in ("x.pt.tmp12345", "x.pt.tmp1", "x.pt.tmpnotes", "y.pt.tmp12345"):  # a killed save leaves the first two
        (tmp_path / name).write_text("half")
    common.save_checkpoint({"a": torch.ones(2)}, str(path))
    assert sorted(os.listdir(tmp_path)) == ["x.pt", "x.pt.tmpnotes", "y.pt.tmp12345"]
    assert torch.equal(common.load_checkpoint(str(path))["a"], torch.ones(2))


def test_checkpoint_errors_are_worded_here(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "text.pt").write_text("hello\n")
    torch.save({"kind": "janus", "model": {"w": torch.tensor([1.0, float("inf")])}}, tmp_path / "inf.pt")
    for name, msg in (("empty.pt", "empty (0 bytes)"), ("text.pt", "not a checkpoint file")):
        with pytest.raises(ValueError, match=re.escape(msg)) as e:
            common.load_checkpoint(str(tmp_path / name), make="python tokenizer.py")
        assert "weights_only" not in str(e.value) and "python tokenizer.py writes a good one" in str(e.value)
    with pytest.raises(ValueError, match=r"non-finite weights .* model\.w"):
        common.load_checkpoint(str(tmp_path / "inf.pt"), finite=True)
    with pytest.raises(ValueError, match="lacks vocab"):
        common.load_checkpoint(str(tmp_path / "inf.pt"), keys=("model", "vocab"))


def test_output_folder_rules(tmp_path):
    out = tmp_path / "o"
    tmp = common.new_output_dir(str(out))  # a new folder: fine
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        common.new_output_dir(str(tmp_path / "f"))
    (open(os.path.join(tmp, "a.png"), "w")).write("1")
    common.publish_dir(tmp, str(out))
    assert sorted(os.listdir(out)) == [common.MARKER, "a.png"]
    tmp = common.new_output_dir(str(out))  # our own earlier output: may be replaced
    (open(os.path.join(tmp, "b.png"), "w")).write("2")
    common.publish_dir(tmp, str(out))
    assert sorted(os.listdir(out)) == [common.MARKER, "b.png"]
    (out / "user.txt").write_text("theirs")
    with pytest.raises(ValueError, match="did not write"):
        common.new_output_dir(str(out))
    assert sorted(os.listdir(tmp_path)) == ["f", "o"]


def test_a_config_that_cannot_be_built_is_one_line():
    from model import JanusConfig
    with pytest.raises(ValueError, match=r"x.pt has a JanusConfig this code cannot build"):
        common.build(JanusConfig, {"n_embd": 64, "n_head": 3}, "x.pt")  # 64 does not split into 3 heads
    with pytest.raises(ValueError, match="cannot build .*flavour"):
        common.build(JanusConfig, {"flavour": 3}, "x.pt")


@pytest.mark.parametrize("times, pays", [
    ([1, 3, 1, 3, 60, 3, 1, 3, 1, 3], True),      # native bf16 (~3x faster), one timing 20x off
    ([60, 3, 1, 3, 1, 3, 1, 3, 1, 3], True),      # the hiccup first: one ratio alone said fp32 here
    ([70, 1, 70, 1, 0.5, 1, 70, 1, 70, 1], False),  # emulated bf16 (~70x slower), one fast fluke
])
def test_bf16_decision_survives_one_bad_timing(monkeypatch, times, pays):
    # best_seconds is called bf16 first, then fp32, five times: the median ratio decides
    it = iter(times)
    monkeypatch.setattr(common, "best_seconds", lambda fn, reps=3: next(it))
    assert common.bf16_pays.__wrapped__("cpu") is pays  # past the per-process cache

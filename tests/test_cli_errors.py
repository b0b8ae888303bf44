"""Bad input at every command line, against checkpoints of the tiny config (built once per module).
Each must end with exit != 0 and ONE line on stderr (no traceback), and leave every file it did not
own untouched: the folder is hashed before and after. The first case of each script runs as a user
runs it (a subprocess: the `__main__` wiring, the interpreter printing the exit message); the rest
call the same `main(argv)` in this process, which shows the same exit and stderr for a tenth of the
time (each subprocess spends seconds importing torch).
Run: python -m pytest -q tests/test_cli_errors.py   (CPU, about 30 s)"""

import contextlib
import hashlib
import importlib
import io
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import sft
import tokenizer
import vit
from sample import janus_checkpoint, load_janus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Evil:  # a pickle that would run code when loaded: it writes a file
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A folder as a user might have it: a tiny run (vq, vit, base), a folder of their own files,
    and broken checkpoints of every kind."""
    w = tmp_path_factory.mktemp("world")
    run = w / "run"
    tokenizer.main(["--config", "tiny", "--out", str(run), "--steps", "4", "--eval-prompts", "7"])
    vit.main(["--config", "tiny", "--out", str(run), "--steps", "2"])
    sft.main(["--stage", "base", "--config", "tiny", "--out", str(run), "--steps", "2", "--no-final-eval"])
    (w / "mine").mkdir()
    (w / "mine" / "notes.txt").write_text("a user's file")
    (w / "afile").write_text("not a folder")
    (w / "empty.pt").write_bytes(b"")
    (w / "text.pt").write_text("hello, I am not a checkpoint\n")
    (w / "text.png").write_text("not an image")
    torch.save({"kind": "janus"}, w / "nokeys.pt")
    model, vq, tok, ckpt = load_janus(str(run / "base.pt"))
    good = janus_checkpoint(model, vq, tok)
    torch.save(dict(good, config=dict(good["config"], flavour=3)), w / "badfield.pt")
    nan = dict(good, model={k: v.clone() for k, v in good["model"].items()})
    nan["model"]["lm_head.weight"][0, 0] = float("nan")
    torch.save(nan, w / "nan.pt")
    with open(w / "evil.pt", "wb") as f:
        torch.save({"kind": "janus", "x": Evil(str(w / "PWNED"))}, f, pickle_protocol=2)
    return w


def tree_hash(folder):
    """{relative path: sha256} of every file under folder."""
    out = {}
    for d, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, folder)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def cases(w):
    """(script, argv, what stderr must name). {out} is a fresh path per case: it must not appear."""
    base, run = str(w / "run" / "base.pt"), str(w / "run")
    s = ["sample.py", "--ckpt", base, "--prompt", "a red circle", "--out", "{out}"]
    return [
        # sampling settings
        (s + ["--cfg", "nan"], "--cfg"), (s + ["--cfg", "inf"], "--cfg"),
        (s + ["--temperature", "nan"], "--temperature"), (s + ["--temperature", "-1"], "--temperature"),
        (s + ["--top-p", "0"], "--top-p"), (s + ["--top-k", "-5"], "--top-k"),
        (s + ["--n", "0"], "--n"), (s + ["--rounds", "0"], "--rounds"), (s + ["--seed", "x"], "--seed"),
        # prompts
        (s[:4] + ["a red giraffe", "--out", "{out}"], "unknown word 'giraffe'"),
        (s[:4] + ["", "--out", "{out}"], "empty prompt"),
        (s[:4] + ["two circles and three squares", "--out", "{out}"], "5 objects"),
        (["sample.py", "--ckpt", base, "--out", "{out}"], "either --prompt or --edit"),
        # devices
        (s + ["--device", "tpu"], "unknown --device"), (s + ["--device", "cuda:7"], "--device cuda:7"),
        # checkpoints
        (s[:2] + [str(w / "none.pt")] + s[3:], "checkpoint not found"),
        (s[:2] + [str(w / "empty.pt")] + s[3:], "empty (0 bytes)"),
        (s[:2] + [str(w / "text.pt")] + s[3:], "not a checkpoint file"),
        (s[:2] + [str(w / "nokeys.pt")] + s[3:], "lacks config"),
        (s[:2] + [str(w / "badfield.pt")] + s[3:], "cannot build"),
        (s[:2] + [str(w / "nan.pt")] + s[3:], "non-finite weights"),
        (s[:2] + [str(w / "evil.pt")] + s[3:], "could run code"),
        (s[:2] + [str(w / "run" / "vq.pt")] + s[3:], "kind=None"),
        # output folders: someone's files, a file, the working folder itself
        (s[:-1] + [str(w / "mine")], "holds files this command did not write"),
        (s[:-1] + [str(w / "afile")], "is a file"),
        (s[:-1] + ["."], "holds files this command did not write"),
        # editing
        (["sample.py", "--ckpt", base, "--edit", str(w / "none.png"), "--instruction", "remove the red circle",
          "--out", "{out}"], "cannot read image"),
        (["sample.py", "--ckpt", base, "--edit", str(w / "text.png"), "--instruction", "remove the red circle",
          "--out", "{out}"], "cannot read image"),
        (["sample.py", "--ckpt", base, "--edit", str(w / "text.png"), "--out", "{out}"], "--instruction"),
        # the stages' numeric flags
        (["tokenizer.py", "--config", "tiny", "--out", "{out}", "--steps", "0"], "--steps"),
        (["tokenizer.py", "--config", "tiny", "--out", "{out}", "--lr", "nan"], "--lr"),
        (["tokenizer.py", "--config", "tiny", "--out", "{out}", "--ckpt-every", "0"], "--ckpt-every"),
        (["tokenizer.py", "--config", "tiny", "--out", str(w / "afile")], "is a file"),
        (["tokenizer.py", "--config", "tiny", "--out", "{out}", "--device", "tpu"], "unknown --device"),
        (["vit.py", "--config", "tiny", "--out", "{out}", "--batch-size", "0"], "--batch-size"),
        (["sft.py", "--stage", "sft", "--config", "tiny", "--out", "{out}"], "vq.pt not found"),
        (["sft.py", "--stage", "sft", "--config", "tiny", "--out", run, "--mix", "nan,1,1"], "--mix"),
        (["sft.py", "--stage", "base", "--config", "tiny", "--out", run, "--eval-prompts", "0"], "--eval-prompts"),
        (["sft.py", "--stage", "sft", "--config", "tiny", "--out", run, "--edit-share", "1.5"], "--edit-share"),
        (["sft.py", "--stage", "sft", "--config", "tiny", "--out", run, "--und-share", "-0.1"], "--und-share"),
        (["sft.py", "--stage", "sft", "--config", "tiny", "--out", run, "--repair-share", "0.5"], "places objects freely"),
        (["sft.py", "--stage", "sft", "--config", "toy", "--out", "{out}", "--repair-share", "2"], "--repair-share"),
        (["sft.py", "--stage", "sft", "--config", "tiny", "--out", run, "--edit-share", "0.1", "--init", base],
         "not for --init"),
        (["run.py", "--config", "tiny", "--out", "{out}", "--ood-prompts", "0"], "--ood-prompts"),
        (["run.py", "--config", "tiny", "--out", "{out}", "--edit-prompts", "0"], "--edit-prompts"),
        # a tiny run folder is not a toy run: nothing of it is reused under another name
        (["run.py", "--config", "toy", "--out", run], "holds a run of config 'tiny'"),
        (["shapes.py", "--size", "0", "--out", "{out}"], "--size"),
        (["shapes.py", "--scene", "a circle"], "--png"),
        (["bench.py", "--batch", "0"], "--batch"), (["bench.py", "--threads", "-3"], "--threads"),
    ]


def in_process(argv, cwd):
    """`python SCRIPT ARGS` as main(ARGS) here -> (exit status, stderr): SystemExit's code as the
    interpreter would turn it into a status and a line; any other exception would be a traceback."""
    err, old = io.StringIO(), os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            importlib.import_module(argv[0][:-3]).main(argv[1:])
        status = 0
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else 1
        if isinstance(e.code, str):
            err.write(e.code + "\n")
    except Exception as e:  # noqa: BLE001 - exactly what the check is for
        status = 1
        err.write(f"Traceback (in process): {e!r}\n")
    finally:
        os.chdir(old)
    return status, err.getvalue()


def test_bad_input_is_one_line_and_touches_nothing(world, tmp_path):
    before = tree_hash(world)
    todo = [(i, argv, want) for i, (argv, want) in enumerate(cases(world))]
    assert len(todo) >= 40
    first = {}  # script -> index of its first case
    for i, argv, _ in todo:
        first.setdefault(argv[0], i)
    # a subprocess for each script's first case, and for bench.py (its main parses sys.argv itself)
    as_user = lambda case: first[case[1][0]] == case[0] or case[1][0] == "bench.py"

    def one(case):
        i, argv, want = case
        out = str(tmp_path / f"out{i}")
        argv = [argv[0]] + [a.replace("{out}", out) for a in argv[1:]]
        if as_user(case):
            r = subprocess.run([sys.executable, os.path.join(ROOT, argv[0])] + argv[1:], cwd=world,
                               capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
            status, err = r.returncode, r.stderr
        else:
            status, err = in_process(argv, world)
        return argv, want, status, err.strip(), os.path.exists(out)

    with ThreadPoolExecutor(2) as pool:  # the subprocesses, two at a time
        results = list(pool.map(one, [c for c in todo if as_user(c)]))
    results += [one(c) for c in todo if not as_user(c)]
    assert len(results) == len(todo) and len(first) >= 7
    bad = []
    for argv, want, status, err, made in results:
        if status == 0 or "Traceback" in err or len(err.splitlines()) != 1 or want not in err or made:
            bad.append(f"{argv}: exit {status}, out made: {made}, stderr: {err[-300:]!r}")
    assert not bad, "\n".join(bad)
    assert tree_hash(world) == before  # no file created, changed or deleted
    assert not (world / "PWNED").exists()


def test_an_output_of_ours_is_replaced_and_nothing_else(world, tmp_path):
    """sample.py may replace a folder it wrote itself (its marker lists every file), and nothing else."""
    import sample
    out = tmp_path / "s"
    argv = ["--ckpt", str(world / "run" / "base.pt"), "--prompt", "a circle", "--n", "2", "--rounds", "1", "--out", str(out)]
    sample.main(argv)
    first = sorted(os.listdir(out))
    assert ".janus-output" in first and "chains.jsonl" in first
    sample.main(argv[:4] + ["--n", "1"] + argv[6:])  # a second run replaces the first, file by file
    assert sorted(os.listdir(out)) == [".janus-output", "chain0_round1.png", "chains.jsonl"]
    (out / "mine.txt").write_text("added by the user")
    with pytest.raises(SystemExit, match="did not write"):
        sample.main(argv)
    assert (out / "mine.txt").read_text() == "added by the user"
    assert sorted(os.listdir(tmp_path)) == ["s"]  # no temporary folder left beside it


def test_readme_sample_command_runs_on_tiny(world, tmp_path):
    """The README's sample command (default --rounds 3) on the tiny model; the loop inside run.py and the
    CLI size their caches by one rule (sample.chain_length), so neither refuses what the other runs."""
    import sample
    out = tmp_path / "s"
    sample.main(["--ckpt", str(world / "run" / "base.pt"), "--prompt", "a red circle to the left of a square",
                 "--n", "2", "--rounds", "3", "--seed", "0", "--out", str(out)])
    lines = [json.loads(l) for l in open(out / "chains.jsonl")]
    assert len(lines) == 2 and all(1 <= len(l["files"]) <= 3 for l in lines)
    assert all(np.isfinite(p) for l in lines for p in l["p_yes"])


def test_sft_does_not_continue_from_a_rebuilt_base(world, tmp_path, capsys):
    """`sft.py --stage base --steps 80` then more steps rewrites base.pt: an SFT state or pool built
    from the old base is refused or rebuilt, never silently reused."""
    import shutil
    run = tmp_path / "run"
    shutil.copytree(world / "run", run)
    sft_argv = ["--stage", "sft", "--config", "tiny", "--out", str(run), "--steps", "1", "--sft-prompts", "3",
                "--samples-per-prompt", "1", "--no-final-eval"]
    sft.main(sft_argv)
    assert (run / "sft_state.pt").exists() and (run / "sft_pool.pt").exists()
    sft.main(["--stage", "base", "--config", "tiny", "--out", str(run), "--steps", "3", "--no-final-eval"])
    capsys.readouterr()
    with pytest.raises(SystemExit, match="started from another base.pt"):
        sft.main(sft_argv)
    assert "sft data" not in capsys.readouterr().out  # refused before any work
    os.remove(run / "sft_state.pt")
    sft.main(sft_argv)
    assert "sft_pool.pt was built from another base.pt" in capsys.readouterr().out

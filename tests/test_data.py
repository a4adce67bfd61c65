"""Tests of data/: shard format, downloader (hub client monkeypatched), tokenizer, synthetic shards."""

import contextlib
import errno
import hashlib
import io
import json
import math
import os
import re
import subprocess
import sys
import types

import numpy as np
import pytest
import tiktoken
from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
sys.path.insert(0, DATA_DIR)

import cached_fineweb10B  # noqa: E402
import fineweb  # noqa: E402
import shards  # noqa: E402
import synthetic  # noqa: E402
from shards import ShardError, read_shard, validate_shard, write_shard  # noqa: E402


# ---------------------------------------------------------------- shards.py

def header_of(path):
    return np.fromfile(path, dtype="<i4", count=shards.HEADER_INTS)


def rewrite_header_field(path, index, value):
    header = header_of(path)
    header[index] = value
    with open(path, "r+b") as f:
        f.write(header.tobytes())


def test_round_trip_and_byte_layout(tmp_path):
    tokens = np.array([0, 1, 50256, 65535, 7], dtype=np.int64)
    path = str(tmp_path / "x_train_000001.bin")
    write_shard(path, tokens)
    assert os.path.getsize(path) == 1024 + 2 * len(tokens)
    assert list(header_of(path)[:3]) == [20240520, 1, 5] and not header_of(path)[3:].any()
    with open(path, "rb") as f:
        f.seek(1024)
        assert np.frombuffer(f.read(), dtype="<u2").tolist() == tokens.tolist()
    assert validate_shard(path) == 5
    out = read_shard(path)
    assert out.dtype == np.uint16 and out.tolist() == tokens.tolist()
    assert not os.path.exists(path + ".partial")


def test_write_refuses_ids_outside_uint16(tmp_path):
    with pytest.raises(ValueError, match="65535"):
        write_shard(str(tmp_path / "a.bin"), np.array([65536]))
    with pytest.raises(ValueError, match="1-D"):
        write_shard(str(tmp_path / "a.bin"), np.zeros((2, 2), dtype=np.int64))
    too_many = np.broadcast_to(np.uint16(0), (shards.MAX_SHARD_TOKENS + 1,))  # 2^31 tokens, a view of one
    with pytest.raises(ValueError, match="2,147,483,648 tokens, more than a shard's header can count"):
        write_shard(str(tmp_path / "a.bin"), too_many)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("corrupt, problem", [
    (lambda p: rewrite_header_field(p, 0, 12345), "bad magic"),
    (lambda p: rewrite_header_field(p, 1, 2), "unsupported version 2"),
    (lambda p: os.truncate(p, 1024 + 2 * 90), "truncated"),
    (lambda p: rewrite_header_field(p, 2, 101), "header says 101 tokens"),
    (lambda p: os.truncate(p, 500), "shorter than the 1024-byte header"),
    (lambda p: open(p, "ab").write(b"\0\0"), "after the 100 tokens"),
])
def test_each_corruption_is_refused_naming_the_file(tmp_path, corrupt, problem):
    path = str(tmp_path / "bad_train_000001.bin")
    write_shard(path, np.arange(100))
    corrupt(path)
    for reader in (validate_shard, read_shard):
        with pytest.raises(ShardError, match=problem) as info:
            reader(path)
        assert path in str(info.value) and isinstance(info.value, ValueError)


def test_shard_filenames_number_val_zero_then_train_from_one():
    names = [shards.shard_filename("fineweb", i) for i in range(3)]
    assert names == ["fineweb_val_000000.bin", "fineweb_train_000001.bin", "fineweb_train_000002.bin"]
    assert [shards.shard_role(name) for name in names] == ["val", "train", "train"]


def test_steps_per_shard_follow_the_stream_rule():
    """Simulate the stream rule of docs/benchmark.md#data literally and compare with the closed form."""
    def simulated_steps(length, batch):
        pos, steps = 0, 0
        while pos + batch + 1 < length:  # the stream moves on when pos + batch + 1 >= length
            steps += 1  # reads tokens[pos : pos + batch + 1]
            pos += batch
        return steps
    for batch in (4, 7, 16):
        for length in range(batch + 1, 12 * batch):
            assert shards.steps_in_shard(length, batch) == simulated_steps(length, batch), (length, batch)
    assert shards.steps_in_shard(3, 4) == 0
    assert shards.steps_in_shard(5, 4) == 0  # batch + 1 tokens: the trainer moves on before reading
    assert shards.steps_in_shard(100_000_000) == 190


def test_train_shards_needed_for_the_recipes():
    assert shards.train_shards_needed(3200) == 17
    assert shards.train_shards_needed(3300) == 18
    assert shards.train_shards_needed(190) == 1 and shards.train_shards_needed(191) == 2
    assert {r: shards.train_shards_needed(shards.recipe_steps(r)) for r in shards.record_recipe_steps()} == \
        {"aurora": 17, "normuon": 18, "muon": 18, "aurora-ema-ref": 16, "soap-muon": 16}
    with pytest.raises(ValueError, match="unknown recipe 'adam'"):
        shards.recipe_steps("adam")


def write_folder(folder, val_tokens, train_sizes):
    os.makedirs(folder, exist_ok=True)
    write_shard(os.path.join(folder, "t_val_000000.bin"), np.zeros(val_tokens, dtype=np.uint16))
    for i, size in enumerate(train_sizes, 1):
        write_shard(os.path.join(folder, f"t_train_{i:06d}.bin"), np.zeros(size, dtype=np.uint16))


def run_listing(*args):
    """`python data/shards.py ARGS` as its main runs it, in this process (the command's start costs a torch
    import): its exit status and what it printed."""
    argv = list(map(str, args))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = shards.main(argv)
        except SystemExit as exit_:  # argparse's refusals
            status = exit_.code
    return subprocess.CompletedProcess(["shards.py", *argv], status, out.getvalue(), err.getvalue())


def test_listing_command_counts_validity_and_sufficiency(tmp_path):
    # Batches of 10 tokens: a 100-token shard feeds 9 steps, so 2 shards feed 18.
    write_folder(tmp_path, 50, [100, 100])
    ok = run_listing(tmp_path, "--steps", 18, "--batch-tokens", 10, "--val-tokens", 50)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "t_train_000002.bin  100 tokens  ok" in ok.stdout and "t_val_000000.bin  50 tokens  ok" in ok.stdout
    assert "18 steps" in ok.stdout and "OK: valid and enough" in ok.stdout

    short = run_listing(tmp_path, "--steps", 19, "--batch-tokens", 10, "--val-tokens", 50)
    assert short.returncode == 1 and "feed 18 steps, the run needs 19" in short.stdout

    small_val = run_listing(tmp_path, "--steps", 5, "--batch-tokens", 10, "--val-tokens", 60)
    assert small_val.returncode == 1 and "fewer than the 60" in small_val.stdout

    os.truncate(tmp_path / "t_train_000001.bin", 1100)
    broken = run_listing(tmp_path, "--steps", 1, "--batch-tokens", 10, "--val-tokens", 50)
    assert broken.returncode == 1
    assert "t_train_000001.bin  INVALID: truncated" in broken.stdout
    assert "feed 0 steps" in broken.stdout  # the stream stops at the first bad shard


def test_listing_command_uses_recipe_step_counts(tmp_path):
    write_folder(tmp_path, 10, [100])
    out = run_listing(tmp_path, "--recipe", "normuon")
    assert out.returncode == 1 and "the run needs 3300" in out.stdout
    assert "fewer than the 10,485,760" in out.stdout


def test_listing_command_refuses_a_path_that_is_no_folder(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert shards.main([str(missing)]) == 2
    assert capsys.readouterr().err == (f"error: {missing}: no such folder; fetch FineWeb with `python "
                                       "data/cached_fineweb10B.py` or write synthetic shards with `python "
                                       "data/synthetic.py`\n")
    write_shard(str(tmp_path / "t_val_000000.bin"), np.arange(10))
    assert shards.main([str(tmp_path / "t_val_000000.bin")]) == 2
    assert capsys.readouterr().err == (f"error: {tmp_path / 't_val_000000.bin'} is a file, not a folder; pass the "
                                       f"folder that holds the shards\n")


def test_listing_command_reports_what_it_cannot_read(tmp_path, run_bound_by_permissions):
    write_folder(tmp_path / "data", 50, [100])
    (tmp_path / "data" / "t_train_000001.bin").chmod(0)
    done = run_bound_by_permissions([sys.executable, os.path.join(DATA_DIR, "shards.py"), str(tmp_path / "data"),
                                     "--steps", "1", "--batch-tokens", "10", "--val-tokens", "50"])
    assert done.returncode == 1 and "t_train_000001.bin  INVALID: cannot read it: Permission denied" in done.stdout
    (tmp_path / "data").chmod(0)
    done = run_bound_by_permissions([sys.executable, os.path.join(DATA_DIR, "shards.py"), str(tmp_path / "data")])
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == f"error: {tmp_path / 'data'}: cannot list it: Permission denied\n"
    (tmp_path / "data").chmod(0o755)


def test_listing_command_checks_the_cpu_preset_with_tiny(tmp_path):
    """--tiny checks against train_gpt.TINY: 200 steps of 4,096 tokens and a val slice of 16,384 tokens."""
    synthetic.write_synthetic_shards(str(tmp_path), vocab_size=512, train_shards=1, tokens_per_shard=201 * 4096,
                                     val_tokens=20_000)
    tiny = run_listing(tmp_path, "--tiny")
    assert tiny.returncode == 0, tiny.stdout + tiny.stderr
    assert "CPU preset" in tiny.stdout and "the run needs 200" in tiny.stdout and "OK: valid and enough" in tiny.stdout
    full = run_listing(tmp_path)  # the same folder against the full-size benchmark
    assert full.returncode == 1 and "the run needs 3200" in full.stdout and "--tiny" in full.stdout
    assert run_listing(tmp_path, "--tiny", "--steps", 300).returncode == 1
    zero = run_listing(tmp_path, "--tiny", "--batch-tokens", 0)
    assert zero.returncode == 2 and zero.stderr.splitlines()[-1].endswith("error: --batch-tokens must be at least 1, got 0")
    # A shard of another vocabulary (GPT-2 ids) in the same folder: a correct header, refused by its ids.
    write_shard(str(tmp_path / "synthetic_train_000002.bin"), np.arange(5000) + 45000)
    other = run_listing(tmp_path, "--tiny")
    assert other.returncode == 1
    assert ("synthetic_train_000002.bin  INVALID: token id 49999, but the vocabulary has 512 ids (0..511)"
            in other.stdout), other.stdout


def test_listing_refuses_shards_of_different_vocabularies_or_headers(tmp_path):
    """Every shard holds its vocabulary's end-of-text id, the highest id (511 of 512; GPT-2's 50256): a set whose
    highest ids differ mixes vocabularies, even where each id is below --vocab-size."""
    write_shard(str(tmp_path / "t_val_000000.bin"), 511 - np.arange(200))
    write_shard(str(tmp_path / "t_train_000001.bin"), 511 - np.arange(200))
    write_shard(str(tmp_path / "t_train_000002.bin"), 999 - np.arange(200))
    write_shard(str(tmp_path / "t_train_000003.bin"), 999 - np.arange(200))
    mixed = run_listing(tmp_path, "--steps", 1, "--batch-tokens", 10, "--val-tokens", 10, "--vocab-size", 1000)
    assert mixed.returncode == 1
    assert ("NOT ENOUGH / INVALID: the shards disagree on their highest token id (their vocabulary's end-of-text id), "
            "so they were written for different vocabularies: 511 in t_val_000000.bin, t_train_000001.bin; 999 in "
            "t_train_000002.bin, t_train_000003.bin; write the set again") in mixed.stdout.splitlines(), mixed.stdout
    for name in ("t_train_000002.bin", "t_train_000003.bin"):
        write_shard(str(tmp_path / name), 511 - np.arange(200))
    assert run_listing(tmp_path, "--steps", 1, "--batch-tokens", 10, "--val-tokens", 10).returncode == 0
    rewrite_header_field(str(tmp_path / "t_train_000003.bin"), 5, 7)  # a header field we always write as 0
    other_header = run_listing(tmp_path, "--steps", 1, "--batch-tokens", 10, "--val-tokens", 10)
    assert other_header.returncode == 1
    assert ("NOT ENOUGH / INVALID: the shard headers disagree beyond the token count (another writer or format "
            "version): t_train_000003.bin differs from t_val_000000.bin at header int 5 (7, not 0); write the set "
            "again") in other_header.stdout.splitlines(), other_header.stdout


@pytest.fixture
def run_bound_by_permissions():
    """subprocess.run for a command that the permission bits of this user's files bind. Root ignores them, so as
    root the command runs in a user namespace as uid 1000, to which root's files then belong (util-linux unshare);
    where that is not possible the test is skipped."""
    prefix = []
    if os.geteuid() == 0:
        prefix = ["unshare", "--user", "--map-user=1000", "--map-group=1000"]
        probe = subprocess.run([*prefix, "true"], capture_output=True)
        if probe.returncode != 0:
            pytest.skip(f"root, and no user namespace to run as a user that permissions bind: {probe.stderr!r}")

    def run(command):
        return subprocess.run([*prefix, *command], capture_output=True, text=True,
                              env=dict(os.environ, HF_HUB_OFFLINE="1"))
    return run


@pytest.mark.parametrize("script, flag", [("synthetic.py", "--out"), ("cached_fineweb10B.py", "--dir")])
def test_a_read_only_folder_is_one_error_before_any_work(tmp_path, run_bound_by_permissions, script, flag):
    folder = tmp_path / "read-only"
    folder.mkdir(mode=0o555)
    run = run_bound_by_permissions
    for target in (folder, folder / "new"):
        done = run([sys.executable, os.path.join(DATA_DIR, script), flag, str(target)])
        assert done.returncode == 2 and done.stdout == "", done.stdout + done.stderr
        assert done.stderr.splitlines()[-1].endswith(
            f"error: {flag} {target}: the folder {folder} is not writable; choose another {flag}"), done.stderr
    assert os.listdir(folder) == []


# ---------------------------------------------------------------- cached_fineweb10B.py

class FakeHub:
    """Stands in for hf_hub_download: records each call and writes a valid shard, or raises."""

    def __init__(self, fail_on=None, error=None):
        self.calls, self.fail_on, self.error = [], fail_on, error

    def __call__(self, repo_id, filename, *, repo_type, local_dir, force_download=False):
        self.calls.append(dict(repo_id=repo_id, filename=filename, repo_type=repo_type, local_dir=local_dir,
                               force_download=force_download))
        if filename == self.fail_on:
            raise self.error
        path = os.path.join(local_dir, filename)
        write_shard(path, np.arange(64))
        return path


@pytest.fixture
def fake_hub(monkeypatch):
    hub = FakeHub()
    monkeypatch.setattr(cached_fineweb10B, "hf_hub_download", hub)
    return hub


def test_downloader_fetches_val_and_first_n_train_shards(tmp_path, fake_hub):
    assert cached_fineweb10B.main(["3", "--dir", str(tmp_path)]) == 0
    assert [c["filename"] for c in fake_hub.calls] == [
        "fineweb_val_000000.bin", "fineweb_train_000001.bin", "fineweb_train_000002.bin", "fineweb_train_000003.bin"]
    assert all(c["repo_id"] == "kjj0/fineweb10B-gpt2" and c["repo_type"] == "dataset"
               and c["local_dir"] == str(tmp_path) and not c["force_download"] for c in fake_hub.calls)


@pytest.mark.parametrize("args, train_shards", [([], 17), (["--recipe", "aurora"], 17), (["--recipe", "normuon"], 18),
                                                (["--recipe", "muon"], 18), (["--steps", "190"], 1)])
def test_downloader_count_for_a_recipe_or_steps(tmp_path, fake_hub, args, train_shards):
    assert cached_fineweb10B.main([*args, "--dir", str(tmp_path)]) == 0
    names = [c["filename"] for c in fake_hub.calls]
    assert names[0] == "fineweb_val_000000.bin" and len(names) == 1 + train_shards
    assert names[-1] == f"fineweb_train_{train_shards:06d}.bin"


def test_downloader_skips_complete_files_and_refetches_truncated_ones(tmp_path, fake_hub):
    write_shard(str(tmp_path / "fineweb_val_000000.bin"), np.arange(10))
    write_shard(str(tmp_path / "fineweb_train_000001.bin"), np.arange(10))
    os.truncate(tmp_path / "fineweb_train_000001.bin", 1024 + 6)
    assert cached_fineweb10B.main(["2", "--dir", str(tmp_path)]) == 0
    calls = {c["filename"]: c["force_download"] for c in fake_hub.calls}
    assert calls == {"fineweb_train_000001.bin": True, "fineweb_train_000002.bin": False}
    assert validate_shard(str(tmp_path / "fineweb_train_000001.bin")) == 64


def test_downloader_refuses_a_bad_download(tmp_path, monkeypatch):
    def corrupt_download(repo_id, filename, *, repo_type, local_dir, force_download=False):
        path = os.path.join(local_dir, filename)
        with open(path, "wb") as f:
            f.write(b"<html>rate limited</html>")
        return path
    monkeypatch.setattr(cached_fineweb10B, "hf_hub_download", corrupt_download)
    with pytest.raises(cached_fineweb10B.DownloadError, match="(?s)fineweb_val_000000.bin: .*not a valid shard"):
        cached_fineweb10B.fetch_shards(1, str(tmp_path), log=lambda _: None)


def http_response(status):
    return types.SimpleNamespace(status_code=status, headers={}, request=None)


@pytest.mark.parametrize("error, hint", [
    (LocalEntryNotFoundError("connection refused"), "could not be reached"),
    (ValueError("Force download failed"), "download from"),
    (GatedRepoError("gated", response=http_response(401)), "hf auth login"),
])
def test_failing_download_gives_a_readable_error(tmp_path, monkeypatch, capsys, error, hint):
    hub = FakeHub(fail_on="fineweb_train_000002.bin", error=error)
    monkeypatch.setattr(cached_fineweb10B, "hf_hub_download", hub)
    assert cached_fineweb10B.main(["3", "--dir", str(tmp_path)]) == 1
    message = capsys.readouterr().err
    assert "could not download fineweb_train_000002.bin from the dataset kjj0/fineweb10B-gpt2" in message
    assert hint in message and type(error).__name__ in message
    assert "2 of 4 files are complete" in message
    assert f"python data/cached_fineweb10B.py 3 --dir {tmp_path}" in message
    assert "HF_HUB_OFFLINE=1" in message and "HF_ENDPOINT=" in message
    assert len(hub.calls) == 3  # stopped at the failure


def test_force_download_failure_reports_the_hub_cause(tmp_path, monkeypatch, capsys):
    cause = LocalEntryNotFoundError("no network")
    wrapped = ValueError("Force download failed due to the above error.")
    wrapped.__cause__ = cause
    monkeypatch.setattr(cached_fineweb10B, "hf_hub_download", FakeHub("fineweb_val_000000.bin", wrapped))
    assert cached_fineweb10B.main(["0", "--dir", str(tmp_path)]) == 1
    assert "LocalEntryNotFoundError: no network" in capsys.readouterr().err


def test_downloader_rejects_shards_the_dataset_lacks(tmp_path):
    with pytest.raises(ValueError, match="1..103"):
        cached_fineweb10B.fetch_shards(104, str(tmp_path))


@pytest.mark.parametrize("args, message", [
    (["104"], "N 104; the dataset has train shards 1..103"),
    (["-1"], "N -1; the dataset has train shards 1..103"),
    (["--steps", "-5"], "--steps must be at least 1, got -5"),
    (["--steps", "0"], "--steps must be at least 1, got 0"),
    (["--steps", "20000"], "--steps 20000 needs 106 train shards; the dataset has train shards 1..103"),
    (["3", "--recipe", "muon"], "give either N or --recipe, not both"),
])
def test_downloader_refuses_bad_arguments_before_any_network_or_folder(tmp_path, fake_hub, capsys, args, message):
    folder = tmp_path / "shards"
    with pytest.raises(SystemExit) as refused:
        cached_fineweb10B.main([*args, "--dir", str(folder)])
    assert refused.value.code == 2 and capsys.readouterr().err.splitlines()[-1].endswith(f"error: {message}")
    assert fake_hub.calls == [] and not folder.exists()


# ---------------------------------------------------------------- fineweb.py

EOT = 256


@pytest.fixture
def byte_encoder():
    """A tiny tiktoken Encoding: one token per byte (id = byte value), EOT = 256."""
    return tiktoken.Encoding(name="bytes", pat_str=r"\S+|\s+", mergeable_ranks={bytes([i]): i for i in range(256)},
                             special_tokens={"<|endoftext|>": EOT})


def expected_stream(docs):
    return [t for d in docs for t in [EOT] + list(d.encode())]


def test_tokenizer_layout_eot_first_val_first_shards_split(tmp_path, byte_encoder):
    docs = ["hello", "a b", "", "<|endoftext|>", "xyz" * 5]
    paths = fineweb.tokenize_to_shards(docs, str(tmp_path), byte_encoder, prefix="t", shard_size=8, workers=1)
    stream = expected_stream(docs)  # special-token text inside a document stays plain bytes
    assert len(stream) == 6 + 4 + 1 + 14 + 16
    assert [os.path.basename(p) for p in paths] == ["t_val_000000.bin"] + [f"t_train_{i:06d}.bin" for i in range(1, 6)]
    contents = [read_shard(p).tolist() for p in paths]
    assert [len(c) for c in contents] == [8, 8, 8, 8, 8, 1]
    assert sum(contents, []) == stream
    assert contents[0][:6] == [EOT, *b"hello"]  # val shard is the first tokens, starting with EOT


def test_tokenizer_reads_local_files_and_uses_a_pool(tmp_path, byte_encoder):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("first doc\nstill first")
    (src / "b.jsonl").write_text(json.dumps({"text": "second"}) + "\n\n" + json.dumps({"text": "third", "id": 3}) + "\n")
    (src / "ignored.md").write_text("not read")
    docs = ["first doc\nstill first", "second", "third"]
    serial = fineweb.tokenize_to_shards(fineweb.documents(fineweb.expand_inputs([str(src)])), str(tmp_path / "one"),
                                        byte_encoder, shard_size=16, workers=1)
    pooled = fineweb.tokenize_to_shards(fineweb.documents(fineweb.expand_inputs([str(src)])), str(tmp_path / "two"),
                                        byte_encoder, shard_size=16, workers=2)
    assert sum((read_shard(p).tolist() for p in serial), []) == expected_stream(docs)
    assert [read_shard(p).tolist() for p in serial] == [read_shard(p).tolist() for p in pooled]


def test_tokenizer_max_shards_and_existing_output(tmp_path, byte_encoder):
    paths = fineweb.tokenize_to_shards(["abcdefgh"] * 4, str(tmp_path), byte_encoder, shard_size=5, workers=1,
                                       max_shards=2)
    assert [validate_shard(p) for p in paths] == [5, 5]
    with pytest.raises(FileExistsError, match="--overwrite"):
        fineweb.tokenize_to_shards(["x"], str(tmp_path), byte_encoder, shard_size=5, workers=1)


def test_tokenizer_input_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*\"text\""):
        list(fineweb.jsonl_documents(str(bad)))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        fineweb.expand_inputs([str(tmp_path / "missing.txt")])
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="x.parquet: .*pip install pyarrow"):
            list(fineweb.file_documents(str(tmp_path / "x.parquet")))


def test_tokenizer_command(tmp_path, byte_encoder, monkeypatch, capsys):
    monkeypatch.setattr(fineweb, "gpt2_encoding", lambda: byte_encoder)
    (tmp_path / "doc.txt").write_text("abc")
    out = tmp_path / "out"
    args = [str(tmp_path / "doc.txt"), "--out", str(out), "--prefix", "p", "--shard-size", "3", "--workers", "1"]
    assert fineweb.main(args) == 0
    assert [read_shard(str(out / n)).tolist() for n in sorted(os.listdir(out))] == [[*b"c"], [EOT, *b"ab"]]
    with pytest.raises(SystemExit) as refused:  # the shards are there now: refused before any work
        fineweb.main(args)
    assert refused.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert fineweb.main([*args, "--overwrite"]) == 0
    with pytest.raises(SystemExit):
        fineweb.main(["--out", str(out)])  # neither files nor --hub


@pytest.mark.parametrize("argv, message", [
    (["{tmp}/missing.txt"], "{tmp}/missing.txt: no such file or folder"),
    (["{tmp}/notes.md"], "{tmp}/notes.md: unsupported file type; use .txt, .jsonl, .parquet"),
    (["{tmp}/empty"], "the inputs hold no .txt, .jsonl or .parquet file"),
    (["{tmp}/doc.txt", "--shard-size", "0"], "--shard-size must be at least 1, got 0"),
    (["{tmp}/doc.txt", "--shard-size", "2147483648"],
     "--shard-size must be at most 2,147,483,647 (a shard header counts its tokens in an int32), got 2,147,483,648"),
    (["{tmp}/doc.txt", "--max-shards", "0"], "--max-shards must be at least 1, got 0"),
    (["{tmp}/doc.txt", "--workers", "0"], "--workers must be at least 1, got 0"),
    (["{tmp}/doc.txt", "--prefix", "a/b"], "--prefix a/b: a file name prefix without '/' (the folder is --out)"),
    (["{tmp}/doc.txt", "--prefix", ""], "--prefix : a file name prefix without '/' (the folder is --out)"),
    (["{tmp}/doc.txt", "--hub-repo", "x/y"], "--hub-repo and --hub-folder apply only with --hub"),
    (["{tmp}/doc.txt", "--out", "{tmp}/doc.txt"], "--out {tmp}/doc.txt: {tmp}/doc.txt is a file, not a folder; "
                                                  "choose another --out"),
    (["{tmp}/doc.txt", "--out", "{tmp}/out"], "{tmp}/out already holds 1 'fineweb_*.bin' shards (e.g. "
                                              "fineweb_val_000000.bin); choose another --out or --prefix, or pass "
                                              "--overwrite"),
])
def test_tokenizer_command_checks_every_argument_before_loading_the_tokenizer(tmp_path, monkeypatch, capsys, argv,
                                                                              message):
    monkeypatch.setattr(fineweb, "gpt2_encoding", lambda: pytest.fail("loaded the tokenizer before the checks"))
    (tmp_path / "doc.txt").write_text("abc")
    (tmp_path / "notes.md").write_text("abc")
    (tmp_path / "empty").mkdir()
    (tmp_path / "out").mkdir()
    write_shard(str(tmp_path / "out" / "fineweb_val_000000.bin"), np.arange(5))
    with pytest.raises(SystemExit) as refused:
        fineweb.main([arg.format(tmp=tmp_path) for arg in argv])
    assert refused.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith("error: " + message.format(tmp=tmp_path))


def test_tokenizer_command_checks_for_pyarrow_before_the_tokenizer(tmp_path, monkeypatch, capsys):
    try:
        import pyarrow  # noqa: F401
        pytest.skip("pyarrow is installed")
    except ImportError:
        pass
    monkeypatch.setattr(fineweb, "gpt2_encoding", lambda: pytest.fail("loaded the tokenizer before the checks"))
    monkeypatch.setattr(fineweb, "list_repo_files", lambda *a, **k: pytest.fail("listed the hub without pyarrow"))
    (tmp_path / "x.parquet").write_bytes(b"")
    for argv, named in (([str(tmp_path / "x.parquet")], str(tmp_path / "x.parquet")),
                        (["--hub"], "HuggingFaceFW/fineweb/sample/10BT")):
        with pytest.raises(SystemExit) as refused:
            fineweb.main([*argv, "--out", str(tmp_path / "out")])
        line = capsys.readouterr().err.splitlines()[-1]
        assert refused.value.code == 2 and f"error: {named}: reading .parquet needs pyarrow" in line
    assert not (tmp_path / "out").exists()


def test_hub_mode_checks_pyarrow_before_listing_or_downloading(monkeypatch):
    try:
        import pyarrow  # noqa: F401
        pytest.skip("pyarrow is installed")
    except ImportError:
        pass
    monkeypatch.setattr(fineweb, "list_repo_files", lambda *a, **k: pytest.fail("listed the hub without pyarrow"))
    with pytest.raises(ImportError, match="HuggingFaceFW/fineweb/sample/10BT: .*pip install pyarrow"):
        fineweb.hub_documents()


# ---------------------------------------------------------------- synthetic.py

SMALL = dict(vocab_size=512, train_shards=2, tokens_per_shard=200_000, val_tokens=100_000)


def digests(paths):
    return [hashlib.sha256(open(p, "rb").read()).hexdigest() for p in paths]


def test_synthetic_is_deterministic_per_seed(tmp_path):
    a = synthetic.write_synthetic_shards(str(tmp_path / "a"), seed=1, **SMALL)
    b = synthetic.write_synthetic_shards(str(tmp_path / "b"), seed=1, **SMALL)
    c = synthetic.write_synthetic_shards(str(tmp_path / "c"), seed=2, **SMALL)
    assert [os.path.basename(p) for p in a] == ["synthetic_val_000000.bin", "synthetic_train_000001.bin",
                                                 "synthetic_train_000002.bin"]
    assert digests(a) == digests(b)
    assert all(x != y for x, y in zip(digests(a), digests(c)))
    more = synthetic.write_synthetic_shards(str(tmp_path / "d"), seed=1, **{**SMALL, "train_shards": 3})
    assert digests(more)[:3] == digests(a)  # adding shards leaves the others unchanged


def test_synthetic_tokens_range_and_documents(tmp_path):
    paths = synthetic.write_synthetic_shards(str(tmp_path), vocab_size=300, train_shards=1, tokens_per_shard=50_000,
                                             val_tokens=20_000, seed=0)
    train = read_shard(paths[1])
    assert [validate_shard(p) for p in paths] == [20_000, 50_000]
    assert train[0] == 299 and train.max() == 299 and train.min() >= 0
    eot_rate = (train == 299).mean()
    assert 0.5 / 128 < eot_rate < 2 / 128
    assert train[-1] != 299 and not np.any((train[1:] == 299) & (train[:-1] == 299))  # no empty documents


def test_synthetic_is_learnable_well_below_log_vocab(tmp_path):
    paths = synthetic.write_synthetic_shards(str(tmp_path), seed=0, **SMALL)
    train = read_shard(paths[1])
    log_v = math.log(512)
    unigram = synthetic.conditional_entropy(train, 0, 512)
    bigram = synthetic.conditional_entropy(train, 1, 512)
    assert unigram > 0.97 * log_v  # nothing to learn from frequencies alone
    assert bigram < 0.75 * log_v  # the previous token already removes a quarter of the entropy
    rate = synthetic.entropy_rate(synthetic.successor_table(512, 0))
    assert rate < 0.5 * log_v  # what a model that infers the topic can reach
    assert bigram > rate


@pytest.mark.parametrize("vocab_size", [2, 3, 5, 65, 512])
def test_the_entropy_printed_counts_the_tokens_a_vocabulary_has(tmp_path, capsys, vocab_size):
    """--vocab-size 2 printed an entropy above log V: the rate counted 64 distinct successors where the vocabulary
    holds one (V - 1 ids besides EOT); successors drawn alike now merge."""
    assert synthetic.main(["--out", str(tmp_path), "--vocab-size", str(vocab_size), "--train-shards", "1",
                           "--tokens-per-shard", "1000", "--val-tokens", "1000"]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    printed = float(re.fullmatch(r"entropy \(nats/token\): log\(V\) = [0-9.]+, language given its topics = ([0-9.]+)",
                                 line)[1])
    assert printed < math.log(vocab_size)
    rate = synthetic.entropy_rate(synthetic.successor_table(vocab_size, 0))
    assert printed == round(rate, 3)
    if vocab_size == 2:  # one successor id: a token tells only whether its document ends there, and the next topic
        q = synthetic.END_PROBABILITY
        assert rate == pytest.approx(-(q * math.log(q) + (1 - q) * math.log(1 - q)) + q * math.log(synthetic.TOPICS),
                                     abs=1e-12)


def test_conditional_entropy_on_known_sequences():
    assert synthetic.conditional_entropy(np.tile([0, 1, 2, 3], 100), 1, 4) == pytest.approx(0.0, abs=1e-12)
    uniform = np.random.default_rng(0).integers(0, 4, 200_000)
    assert synthetic.conditional_entropy(uniform, 0, 4) == pytest.approx(math.log(4), abs=1e-3)
    assert synthetic.conditional_entropy(uniform, 1, 4) == pytest.approx(math.log(4), abs=1e-3)


@pytest.mark.parametrize("args, message", [
    (["--train-shards", "0"], "--train-shards must be at least 1, got 0"),
    (["--tokens-per-shard", "-3"], "--tokens-per-shard must be at least 1, got -3"),
    (["--val-tokens", "0"], "--val-tokens must be at least 1, got 0"),
    (["--vocab-size", "70000"], "--vocab-size must be in [2, 65536] (ids are stored as uint16), got 70000"),
    (["--seed", "-1"], "--seed must be 0 or more (numpy seeds are non-negative), got -1"),
    (["--val-tokens", "100000000000000"], "--val-tokens must be at most 2,147,483,647 (a shard header counts its "
                                          "tokens in an int32), got 100,000,000,000,000"),
    (["--tokens-per-shard", "2147483648"], "--tokens-per-shard must be at most 2,147,483,647 (a shard header counts "
                                           "its tokens in an int32), got 2,147,483,648"),
    (["--train-shards", "1000000"], "--train-shards must be at most 999,999 (shard names have 6 digits), "
                                    "got 1,000,000"),
])
def test_synthetic_refuses_bad_numbers_before_writing(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as refused:
        synthetic.main([*args, "--out", str(out)])
    assert refused.value.code == 2 and capsys.readouterr().err.splitlines()[-1].endswith(f"error: {message}")
    assert not out.exists()


def test_synthetic_refuses_a_set_larger_than_the_free_disk_space(tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as refused:
        synthetic.main(["--out", str(out), "--train-shards", "999999", "--tokens-per-shard", "2147483647"])
    line = capsys.readouterr().err.splitlines()[-1]
    # 1,024 + 2 * 2,147,483,647 bytes for each of the 999,999 train shards, 1,024 + 2 * 1,000,000 for the val shard.
    assert refused.value.code == 2 and "error: --out " + str(out) + ": the shards take 4,294,964,025 MB, more " \
        "than the " in line and line.endswith(" MB free there; write fewer or smaller shards"), line
    assert not out.exists()


def test_synthetic_replaces_the_folders_shards_as_a_set(tmp_path):
    """A second run into the same folder, with fewer shards and another vocabulary, leaves none of the first run's
    shards beside its own; files that are not synthetic shards stay as they were."""
    out = tmp_path / "out"
    synthetic.write_synthetic_shards(str(out), vocab_size=1000, train_shards=3, tokens_per_shard=5000, val_tokens=3000)
    (out / "notes.txt").write_text("mine")
    write_shard(str(out / "other_train_000001.bin"), np.arange(10))
    paths = synthetic.write_synthetic_shards(str(out), vocab_size=512, train_shards=1, tokens_per_shard=4000,
                                             val_tokens=2000)
    assert sorted(os.listdir(out)) == ["notes.txt", "other_train_000001.bin", "synthetic_train_000001.bin",
                                       "synthetic_val_000000.bin"]
    assert [os.path.basename(p) for p in paths] == ["synthetic_val_000000.bin", "synthetic_train_000001.bin"]
    assert [int(read_shard(p).max()) for p in paths] == [511, 511] and validate_shard(paths[1]) == 4000
    assert (out / "notes.txt").read_text() == "mine" and validate_shard(str(out / "other_train_000001.bin")) == 10


def test_a_failed_write_leaves_the_earlier_set_as_it_was(tmp_path, monkeypatch, capsys):
    """The disk fills while the second shard of a new set is written: one error line, the earlier set untouched,
    no hidden staging folder left, and a folder made for the set removed again."""
    out = tmp_path / "out"
    earlier = synthetic.write_synthetic_shards(str(out), vocab_size=512, train_shards=2, tokens_per_shard=5000,
                                               val_tokens=3000)
    before = digests(earlier)
    written = []

    def disk_fills_after_one_shard(path, tokens):
        if written:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        written.append(path)
        write_shard(path, tokens)
    monkeypatch.setattr(synthetic, "write_shard", disk_fills_after_one_shard)
    for folder in (out, tmp_path / "new"):
        written.clear()
        assert synthetic.main(["--out", str(folder), "--vocab-size", "1000", "--train-shards", "3"]) == 1
        assert capsys.readouterr().err.startswith(f"error: writing the shards into {folder}: [Errno 28] No space")
    assert sorted(os.listdir(out)) == sorted(os.path.basename(p) for p in earlier) and digests(earlier) == before
    assert not (tmp_path / "new").exists()


def test_synthetic_command_default_layout(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(DATA_DIR, "synthetic.py"), "--out", str(tmp_path),
                          "--vocab-size", "1000", "--train-shards", "3", "--tokens-per-shard", "10000",
                          "--val-tokens", "5000", "--seed", "4"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert sorted(os.listdir(tmp_path)) == ["synthetic_train_000001.bin", "synthetic_train_000002.bin",
                                            "synthetic_train_000003.bin", "synthetic_val_000000.bin"]
    assert read_shard(str(tmp_path / "synthetic_train_000003.bin")).max() == 999

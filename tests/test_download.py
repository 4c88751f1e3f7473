"""data/download_fineweb.py against a local stand-in for the Hugging Face hub: an HTTP server that
answers the hub's `resolve` URLs (HEAD with commit/ETag/size headers, GET with ranges) from a folder.
Checks the manifest-driven plan, header verification, skipping what is already there (resumable),
re-fetching a damaged local file, and one clear line for a bad variant or a bad remote shard."""

import hashlib
import http.server
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT
from train_gpt import read_shard, write_shard

REPO = "someone/parameter-golf"


class HubStandIn(http.server.ThreadingHTTPServer):
    def __init__(self, root: Path):
        self.root, self.requests = root, []
        super().__init__(("127.0.0.1", 0), HubHandler)


class HubHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _file(self):
        prefix = f"/datasets/{REPO}/resolve/"
        if not self.path.startswith(prefix):
            return None
        rel = self.path[len(prefix):].split("/", 1)[1]  # drop the revision
        path = self.server.root / rel
        return path if path.is_file() else None

    def _headers(self, path, body_len, status=200, extra=None):
        data = path.read_bytes()
        self.send_response(status)
        self.send_header("X-Repo-Commit", "c" * 40)
        self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
        self.send_header("Content-Length", str(body_len))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()

    def _lookup(self, method: str):
        """The requested file, or None after answering 404."""
        self.server.requests.append((method, self.path))
        path = self._file()
        if path is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
        return path

    def do_HEAD(self):
        path = self._lookup("HEAD")
        if path is not None:
            self._headers(path, path.stat().st_size)

    def do_GET(self):
        path = self._lookup("GET")
        if path is None:
            return
        data = path.read_bytes()
        start = 0
        if self.headers.get("Range", "").startswith("bytes="):
            start = int(self.headers["Range"][6:].split("-")[0])
        if start:
            self._headers(path, len(data) - start, 206, {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"})
        else:
            self._headers(path, len(data))
        self.wfile.write(data[start:])


def serve(root: Path, name: str, files_train: int, sidecar_len: int | None = None):
    """A stand-in repository with 3 training shards and one validation shard of 777 tokens of dataset
    `name`, a manifest that claims `files_train`, and (sidecar_len) a byte sidecar."""
    shards = root / "datasets" / "datasets" / name
    shards.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        write_shard(shards / f"fineweb_train_{i:06d}.bin", rng.integers(0, 1024, 5000 + i))
    write_shard(shards / "fineweb_val_000000.bin", rng.integers(0, 1024, 777))
    if sidecar_len is not None:
        write_shard(shards / "fineweb_val_bytes_000000.bin", rng.integers(0, 12, sidecar_len))
    (root / "datasets" / "tokenizers").mkdir(parents=True)
    (root / "datasets" / "tokenizers" / "fineweb_1024_bpe.model").write_bytes(b"tokenizer bytes")
    (root / "datasets" / "tokenizers" / "fineweb_1024_bpe.vocab").write_bytes(b"vocab")
    manifest = {
        "datasets": [{"name": name, "tokenizer_name": "sp_bpe_1024", "stats": {"files_train": files_train, "files_val": 1}}],
        "tokenizers": [{"name": "sp_bpe_1024", "model_path": "tokenizers/fineweb_1024_bpe.model",
                        "vocab_path": "tokenizers/fineweb_1024_bpe.vocab"}],
    }
    (root / "datasets" / "manifest.json").write_text(json.dumps(manifest))
    server = HubStandIn(root)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture()
def hub(tmp_path):
    root = tmp_path / "remote"
    server = serve(root, "fineweb10B_sp1024", 3)
    yield server, root
    server.shutdown()


def download(server, out, *args, patch: dict | None = None):
    """Run data/download_fineweb.py against the stand-in; `patch` sets module constants first (the
    canonical CaseOps counts, which a stand-in of a few KB cannot have)."""
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}", "HF_HOME": str(out.parent / "hf_home"),
           "HF_HUB_DISABLE_TELEMETRY": "1", "PATH": "/usr/bin:/bin"}
    script = ["import sys; sys.path.insert(0, 'data'); import download_fineweb as d"]
    script += [f"d.{k} = {v!r}" for k, v in (patch or {}).items()] + ["sys.exit(d.main(sys.argv[1:]))"]
    cmd = [sys.executable, "-c", "; ".join(script), "--repo-id", REPO, "--out", str(out), "--retries", "1", *args]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)


def gets(server):
    return sorted(p.rsplit("/", 1)[1] for m, p in server.requests if m == "GET")


def test_downloads_verifies_and_resumes(hub, tmp_path):
    server, root = hub
    out = tmp_path / "data"
    proc = download(server, out, "--variant", "sp1024", "--train-shards", "2")
    assert proc.returncode == 0, proc.stderr
    local = out / "datasets" / "fineweb10B_sp1024"
    assert sorted(p.name for p in local.iterdir()) == ["fineweb_train_000000.bin", "fineweb_train_000001.bin",
                                                       "fineweb_val_000000.bin"]
    remote = root / "datasets" / "datasets" / "fineweb10B_sp1024"
    for p in local.iterdir():
        assert p.read_bytes() == (remote / p.name).read_bytes()
    assert (out / "tokenizers" / "fineweb_1024_bpe.model").read_bytes() == b"tokenizer bytes"
    assert "[5/5]" in proc.stdout

    # Run again with one more shard and a damaged local shard: the new shard is fetched, the
    # damaged one is restored (from the hub cache, after a HEAD that checks it is current).
    server.requests.clear()
    damaged = local / "fineweb_train_000000.bin"
    damaged.write_bytes(damaged.read_bytes()[:-10])
    proc = download(server, out, "--variant", "sp1024", "--train-shards", "3")
    assert proc.returncode == 0, proc.stderr
    assert gets(server) == ["fineweb_train_000002.bin"]
    heads = [p.rsplit("/", 1)[1] for m, p in server.requests if m == "HEAD"]
    assert "fineweb_train_000000.bin" in heads and "fineweb_train_000001.bin" not in heads
    assert len(read_shard(damaged, 1024)) == 5000
    assert not list(local.glob(".*part"))


def test_bad_requests_are_one_line(hub, tmp_path):
    server, root = hub
    out = tmp_path / "data"
    cases = [
        (["--variant", "bpe"], "sp<VOCAB_SIZE>"),
        (["--variant", "sp8192"], "fineweb10B_sp8192 is not in the manifest"),
        (["--variant", "sp1024", "--train-shards", "9"], "has only 3 training shards"),
    ]
    for args, words in cases:
        proc = download(server, out, *args)
        assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and words in proc.stderr, proc.stderr
    bad = root / "datasets" / "datasets" / "fineweb10B_sp1024" / "fineweb_val_000000.bin"
    bad.write_bytes(b"\0" * 1100)
    proc = download(server, out, "--variant", "sp1024", "--train-shards", "0")
    assert proc.returncode == 2 and "bad header or size" in proc.stderr, proc.stderr
    assert not (out / "datasets" / "fineweb10B_sp1024" / "fineweb_val_000000.bin").exists()


CASEOPS = "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved"
# The stand-in's canonical counts: 3 training shards, 777 validation tokens (768 targets in windows of 16).
STAND_IN_COUNTS = {"CASEOPS_TRAIN_SHARDS": 3, "CASEOPS_VAL_TARGETS": 768, "CASEOPS_VAL_WINDOW": 16}


@pytest.mark.parametrize("files_train, sidecar_len, patch, words", [
    (1499, 777, None, "challenge issue #2127"),  # the leaky build, refused from its manifest alone
    (79, 777, None, "the canonical export has 80"),
    (80, 777, None, "777 validation tokens; the canonical export has 47,851,521 to 47,853,568"),
    (3, 776, STAND_IN_COUNTS, "776 byte counts for the 777 tokens"),
])
def test_caseops_refuses_anything_but_the_canonical_build(tmp_path, files_train, sidecar_len, patch, words):
    server = serve(tmp_path / "remote", CASEOPS, files_train, sidecar_len)
    try:
        proc = download(server, tmp_path / "data", "--variant", "caseops", "--train-shards", "3", patch=patch)
    finally:
        server.shutdown()
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and words in proc.stderr, proc.stderr
    assert not [g for g in gets(server) if g.startswith("fineweb_train")]  # refused before the training data


def test_caseops_downloads_the_sidecar_beside_the_validation_shard(tmp_path):
    server = serve(tmp_path / "remote", CASEOPS, 3, 777)
    try:
        proc = download(server, tmp_path / "data", "--variant", "caseops", "--train-shards", "2", patch=STAND_IN_COUNTS)
    finally:
        server.shutdown()
    assert proc.returncode == 0, proc.stderr
    local = tmp_path / "data" / "datasets" / CASEOPS
    assert sorted(p.name for p in local.iterdir()) == ["fineweb_train_000000.bin", "fineweb_train_000001.bin",
                                                       "fineweb_val_000000.bin", "fineweb_val_bytes_000000.bin"]

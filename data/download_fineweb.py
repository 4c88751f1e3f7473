"""Download the challenge's pre-tokenised FineWeb shards and tokenizer from the Hugging Face hub.

    python data/download_fineweb.py --variant sp1024 --train-shards 80
    python data/download_fineweb.py --variant sp8192 --train-shards 128
    python data/download_fineweb.py --variant caseops

The hub repository (a dataset repo) holds `<prefix>/manifest.json`, which lists each dataset
(`fineweb10B_<variant>`: its shard counts and tokenizer name) and each tokenizer (its files). This
script reads the manifest, downloads the validation shards, the first N training shards and the
tokenizer into

    data/datasets/fineweb10B_<variant>/fineweb_{val,train}_NNNNNN.bin
    data/tokenizers/<tokenizer files>

verifies every shard's header and size, and can be stopped and restarted at any time: files that
are already present and valid are skipped, partial downloads resume from the hub cache, and a file
appears under data/ only once it is complete (copied to a temporary name, then renamed).

Repositories: sp1024 from willdepueoai/parameter-golf, sp8192 from
kevclark/parameter-golf; `--repo-id` (or MATCHED_FINEWEB_REPO_ID, the community's variable)
overrides. `--endpoint` (or HF_ENDPOINT) points at another hub, e.g. a mirror or a test stand-in.

`--variant caseops` is the CaseOps export the final leaderboard trained on (romeerp/parameter-golf-
caseops-v1: sp8192 tokens of the case-transformed text, data/caseops.py), with a byte sidecar
fineweb_val_bytes_NNNNNN.bin beside each validation shard. Only the canonical build is accepted: 80
training shards, and the first 50,000 documents for validation (the records scored 47,851,520 of
its tokens, whole 2048-token windows) with a sidecar of the same length. A build with 1,499 training shards put most validation documents into training
(challenge issue #2127) and is refused before anything large is downloaded.
"""

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train_gpt import DataError, read_shard_header, sidecar_path  # noqa: E402  (one definition of the format)

DEFAULT_REPOS = {"sp1024": "willdepueoai/parameter-golf", "sp8192": "kevclark/parameter-golf",
                 "caseops": "romeerp/parameter-golf-caseops-v1"}
FALLBACK_REPO = "willdepueoai/parameter-golf"
CASEOPS_DATASET = "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved"
CASEOPS_TRAIN_SHARDS = 80
# The records score (tokens - 1) // 2048 * 2048 = 47,851,520 targets of the validation set (their
# logs' val_tokens), so its shards hold between 47,851,521 and 47,853,568 tokens (47,853,343 is
# quoted for the export); a truncated set holds millions fewer.
CASEOPS_VAL_TARGETS = 47_851_520
CASEOPS_VAL_WINDOW = 2048
LEAKY_TRAIN_SHARDS = 1499


class DownloadError(Exception):
    """Printed as one line, exit status 2."""


def dataset_name(variant: str) -> str:
    if variant == "caseops":
        return CASEOPS_DATASET
    if not (variant.startswith("sp") and variant[2:].isdigit()):
        raise DownloadError(f"--variant {variant!r} is neither caseops nor of the form sp<VOCAB_SIZE> "
                            "(e.g. sp1024, sp8192)")
    return f"fineweb10B_{variant}"


def check_caseops_manifest(n_train: int) -> None:
    if n_train == LEAKY_TRAIN_SHARDS:
        raise DownloadError(f"{CASEOPS_DATASET} lists {n_train} training shards: that is the build whose training "
                            "documents include most of the validation documents (challenge issue #2127); use the "
                            f"canonical export with {CASEOPS_TRAIN_SHARDS}")
    if n_train != CASEOPS_TRAIN_SHARDS:
        raise DownloadError(f"{CASEOPS_DATASET} lists {n_train} training shards, the canonical export has "
                            f"{CASEOPS_TRAIN_SHARDS}: this is not the build the leaderboard used")


def check_caseops_validation(val_shards: list[Path]) -> None:
    """The validation tokens the records scored (CASEOPS_VAL_TARGETS in whole windows), each shard with
    a sidecar of its own length."""
    total = 0
    for shard in val_shards:
        n = read_shard_header(shard)
        side = Path(sidecar_path(str(shard)))
        if read_shard_header(side) != n:
            raise DownloadError(f"{side} holds {read_shard_header(side)} byte counts for the {n} tokens of "
                                f"{shard.name}: they must align 1:1")
        total += n
    if (total - 1) // CASEOPS_VAL_WINDOW * CASEOPS_VAL_WINDOW != CASEOPS_VAL_TARGETS:
        raise DownloadError(f"{CASEOPS_DATASET} has {total:,} validation tokens; the canonical export has "
                            f"{CASEOPS_VAL_TARGETS + 1:,} to {CASEOPS_VAL_TARGETS + CASEOPS_VAL_WINDOW:,} (50,000 "
                            f"documents, {CASEOPS_VAL_TARGETS:,} scored in {CASEOPS_VAL_WINDOW}-token windows): a "
                            "truncated or re-split validation set scores a different text")


class Hub:
    """hf_hub_download into the hub cache (which resumes partial files), then an atomic copy."""

    def __init__(self, repo_id: str, endpoint: str | None, retries: int):
        self.repo_id, self.endpoint, self.retries = repo_id, endpoint, retries

    def fetch(self, remote_path: str, dest: Path) -> None:
        from huggingface_hub import hf_hub_download

        for attempt in range(1, self.retries + 1):
            try:
                cached = hf_hub_download(self.repo_id, remote_path, repo_type="dataset", endpoint=self.endpoint)
                break
            except Exception as e:  # network errors come in many types; the last one is reported
                if attempt == self.retries:
                    raise DownloadError(f"{remote_path} from {self.repo_id}: {type(e).__name__}: "
                                        f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
                wait = min(2 ** attempt, 30)
                print(f"retry {attempt}/{self.retries - 1} for {remote_path} in {wait}s ({type(e).__name__})",
                      file=sys.stderr, flush=True)
                time.sleep(wait)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.part")
        shutil.copyfile(Path(cached).resolve(), tmp)
        os.replace(tmp, dest)


def shard_is_valid(path: Path) -> bool:
    try:
        read_shard_header(path)
        return True
    except (DataError, OSError):
        return False


def plan(manifest: dict, variant: str, train_shards: int, prefix: str, out: Path) -> list[tuple[str, Path, str]]:
    """-> [(remote path, local destination, kind)] for everything the run needs."""
    name = dataset_name(variant)
    entry = next((d for d in manifest.get("datasets", []) if d.get("name") == name), None)
    if entry is None:
        known = ", ".join(d.get("name", "?") for d in manifest.get("datasets", []))
        raise DownloadError(f"dataset {name} is not in the manifest (it lists: {known or 'nothing'})")
    stats = entry.get("stats") or {}
    n_train, n_val = int(stats.get("files_train", 0)), int(stats.get("files_val", 0))
    if variant == "caseops":
        check_caseops_manifest(n_train)
    if train_shards > n_train:
        raise DownloadError(f"--train-shards {train_shards}: {name} has only {n_train} training shards")
    tok = next((t for t in manifest.get("tokenizers", []) if t.get("name") == entry.get("tokenizer_name")), None)
    if tok is None:
        raise DownloadError(f"tokenizer {entry.get('tokenizer_name')!r} of {name} is not in the manifest")
    pre = f"{prefix}/" if prefix else ""
    val = [f"fineweb_val_{i:06d}.bin" for i in range(n_val)]
    if variant == "caseops":
        val = [f for shard in val for f in (shard, sidecar_path(shard))]
    items = [(f"{pre}datasets/{name}/{f}", out / "datasets" / name / f, "val") for f in val]
    for key in ("model_path", "vocab_path"):
        if tok.get(key):
            items.append((f"{pre}{tok[key]}", out / tok[key], "tokenizer"))
    items += [(f"{pre}datasets/{name}/fineweb_train_{i:06d}.bin", out / "datasets" / name / f"fineweb_train_{i:06d}.bin",
               "train") for i in range(train_shards)]
    return items


def download(variant: str, train_shards: int, out: Path, repo_id: str, prefix: str = "datasets",
             endpoint: str | None = None, retries: int = 4) -> list[Path]:
    hub = Hub(repo_id, endpoint, retries)
    manifest_path = out / "manifest.json"
    hub.fetch(f"{prefix}/manifest.json" if prefix else "manifest.json", manifest_path)
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DownloadError(f"manifest from {repo_id} is not valid JSON: {e}") from None
    items = plan(manifest, variant, train_shards, prefix, out)
    print(f"download: {len(items)} files of {dataset_name(variant)} from {repo_id} into {out}", flush=True)
    t0, fetched_bytes = time.time(), 0
    for i, (remote, dest, kind) in enumerate(items, 1):
        shard = kind in ("val", "train")
        ready = dest.is_file() and (not shard or shard_is_valid(dest))
        if not ready:
            hub.fetch(remote, dest)
            if shard and not shard_is_valid(dest):
                dest.unlink()
                raise DownloadError(f"{remote} from {repo_id} has a bad header or size; removed, run again")
            fetched_bytes += dest.stat().st_size
        rate = fetched_bytes / 1e6 / max(time.time() - t0, 1e-9)
        print(f"[{i}/{len(items)}] {'ready' if ready else 'downloaded'} {dest} ({rate:.0f} MB/s so far)", flush=True)
        if variant == "caseops" and kind == "val" and (i == len(items) or items[i][2] != "val"):
            # the validation set is checked before the 16 GB of training shards
            check_caseops_validation([d for _, d, k in items if k == "val" and "_bytes_" not in d.name])
    print(f"done: {len(items)} files verified in {time.time() - t0:.0f}s", flush=True)
    return [dest for _, dest, _ in items]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", default="sp1024",
                    help="sp1024, sp8192 (any sp<V> the manifest lists) or caseops (the sp8192 CaseOps export)")
    ap.add_argument("--train-shards", type=int, default=80, help="how many training shards (100M tokens each)")
    ap.add_argument("--repo-id", default=None, help="dataset repository on the hub (default: by variant)")
    ap.add_argument("--prefix", default="datasets", help="folder of the repository that holds manifest.json")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent), help="root of datasets/ and tokenizers/")
    ap.add_argument("--endpoint", default=None, help="hub endpoint (default: HF_ENDPOINT or the public hub)")
    ap.add_argument("--retries", type=int, default=4)
    args = ap.parse_args(argv)
    if args.train_shards < 0 or args.retries < 1:
        print("error: --train-shards must be >= 0 and --retries >= 1", file=sys.stderr)
        return 2
    repo = args.repo_id or os.environ.get("MATCHED_FINEWEB_REPO_ID") or DEFAULT_REPOS.get(args.variant, FALLBACK_REPO)
    try:
        download(args.variant, args.train_shards, Path(args.out), repo, args.prefix, args.endpoint, args.retries)
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Tokenize raw text with tiktoken's GPT-2 encoding into shards in the format of docs/benchmark.md#data.

    python data/fineweb.py docs/ more.jsonl --out data/mytokens          # local files
    python data/fineweb.py --hub --max-shards 18                         # FineWeb sample-10BT from the hub

Every document is prefixed with EOT and documents are packed back to back, crossing shard boundaries;
the first shard written is the val shard ({prefix}_val_000000.bin), the rest are train shards
({prefix}_train_000001.bin, ...); the last one holds what is left. A tqdm bar per shard.

Inputs: a .txt file is one document; a .jsonl file holds one JSON object per line with the document in
"text"; a .parquet file has a "text" column (reading it needs pyarrow, which is not in requirements.txt:
`pip install pyarrow`). A folder stands for its files with these suffixes, in sorted order. With --hub,
the parquet files of HuggingFaceFW/fineweb's sample/10BT folder are fetched through huggingface_hub
(into the hub cache, one at a time as the tokenizer reaches them), so --hub needs pyarrow too.
"""

import argparse
import json
import multiprocessing
import os
import sys

import numpy as np
from huggingface_hub import hf_hub_download, list_repo_files
from tqdm import tqdm

from shards import MAX_SHARD_TOKENS, MAX_TOKEN_ID, TOKENS_PER_SHARD, check_output_folder, shard_filename, write_shard

SUFFIXES = (".txt", ".jsonl", ".parquet")
HUB_REPO = "HuggingFaceFW/fineweb"
HUB_FOLDER = "sample/10BT"
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fineweb10B")
DOCUMENTS_PER_TASK = 16  # documents sent to a worker at a time


def expand_inputs(inputs):
    """Files to read, in order: each file as given, each folder as its supported files, sorted."""
    files = []
    for item in inputs:
        if os.path.isdir(item):
            files.extend(os.path.join(item, name) for name in sorted(os.listdir(item)) if name.endswith(SUFFIXES))
        elif os.path.isfile(item):
            if not item.endswith(SUFFIXES):
                raise ValueError(f"{item}: unsupported file type; use {', '.join(SUFFIXES)}")
            files.append(item)
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")
    return files


def import_pyarrow_parquet(path):
    try:
        import pyarrow.parquet
    except ImportError:
        raise ImportError(f"{path}: reading .parquet needs pyarrow, which is not installed (not in "
                          f"requirements.txt): `pip install pyarrow`, or convert the file to .jsonl") from None
    return pyarrow.parquet


def parquet_documents(path):
    parquet = import_pyarrow_parquet(path)
    for batch in parquet.ParquetFile(path).iter_batches(columns=["text"]):
        yield from batch.column(0).to_pylist()


def jsonl_documents(path):
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"{path}:{line_number}: expected a JSON object with a string field \"text\"")
            yield record["text"]


def file_documents(path):
    """The documents of one local file (see the module docstring for each format)."""
    if path.endswith(".parquet"):
        yield from parquet_documents(path)
    elif path.endswith(".jsonl"):
        yield from jsonl_documents(path)
    else:
        with open(path, encoding="utf-8") as f:
            yield f.read()


def hub_parquet_files(repo_id=HUB_REPO, folder=HUB_FOLDER):
    names = sorted(name for name in list_repo_files(repo_id, repo_type="dataset")
                   if name.startswith(folder + "/") and name.endswith(".parquet"))
    if not names:
        raise FileNotFoundError(f"the dataset {repo_id} has no .parquet files under {folder}/")
    return names


def hub_documents(repo_id=HUB_REPO, folder=HUB_FOLDER):
    """Documents of the hub dataset's parquet files, each file downloaded when the tokenizer reaches it.
    Checks for pyarrow and lists the files now, so a problem shows before any work starts."""
    import_pyarrow_parquet(f"{repo_id}/{folder}")
    names = hub_parquet_files(repo_id, folder)
    return (doc for name in names for doc in parquet_documents(hf_hub_download(repo_id, name, repo_type="dataset")))


def documents(files):
    for path in files:
        yield from file_documents(path)


_worker_encoder = None


def _set_worker_encoder(encoder):
    global _worker_encoder
    _worker_encoder = encoder


def encode_document(text, encoder=None):
    """[EOT] + the document's tokens (special-token text inside a document is encoded as plain text)."""
    encoder = encoder or _worker_encoder
    return np.array([encoder.eot_token] + encoder.encode_ordinary(text), dtype=np.uint16)


def pack_into_shards(token_arrays, out_dir, prefix, shard_size, max_shards=None):
    """Pack the token arrays back to back into shards of shard_size tokens (the last one shorter), val
    first; stop after max_shards shards if given. Returns the written paths."""
    paths = []
    buffer = np.empty(shard_size, dtype=np.uint16)
    filled = 0
    bar = None

    def flush():
        nonlocal filled, bar
        path = os.path.join(out_dir, shard_filename(prefix, len(paths)))
        write_shard(path, buffer[:filled])
        paths.append(path)
        filled = 0
        bar.close()
        bar = None

    for tokens in token_arrays:
        while tokens.size:
            if bar is None:
                bar = tqdm(total=shard_size, unit="tokens", unit_scale=True,
                           desc=shard_filename(prefix, len(paths)))
            take = min(shard_size - filled, tokens.size)
            buffer[filled:filled + take] = tokens[:take]
            filled += take
            bar.update(take)
            tokens = tokens[take:]
            if filled == shard_size:
                flush()
                if len(paths) == max_shards:
                    return paths
    if filled:
        flush()
    return paths


def refuse_existing_shards(out_dir, prefix):
    existing = [name for name in os.listdir(out_dir) if name.startswith(prefix + "_") and name.endswith(".bin")]
    if existing:
        raise FileExistsError(f"{out_dir} already holds {len(existing)} '{prefix}_*.bin' shards (e.g. "
                              f"{sorted(existing)[0]}); choose another --out or --prefix, or pass --overwrite")


def tokenize_to_shards(docs, out_dir, encoder, prefix="fineweb", shard_size=TOKENS_PER_SHARD, workers=None,
                       max_shards=None, overwrite=False):
    """Tokenize an iterable of document strings into shards in out_dir; return the shard paths, val first.
    workers=1 encodes in this process; otherwise a multiprocessing pool of `workers` (default: all cores)
    encodes while this process packs, keeping document order."""
    if encoder.max_token_value > MAX_TOKEN_ID:
        raise ValueError(f"encoder {encoder.name} has ids up to {encoder.max_token_value}; shards store uint16")
    if shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    os.makedirs(out_dir, exist_ok=True)
    if not overwrite:
        refuse_existing_shards(out_dir, prefix)
    workers = workers or os.cpu_count()
    if workers == 1:
        return pack_into_shards((encode_document(d, encoder) for d in docs), out_dir, prefix, shard_size, max_shards)
    with multiprocessing.Pool(workers, initializer=_set_worker_encoder, initargs=(encoder,)) as pool:
        encoded = pool.imap(encode_document, docs, chunksize=DOCUMENTS_PER_TASK)
        return pack_into_shards(encoded, out_dir, prefix, shard_size, max_shards)


def gpt2_encoding():
    """tiktoken's GPT-2 encoding; its BPE files are downloaded on first use, then cached."""
    import tiktoken
    try:
        return tiktoken.get_encoding("gpt2")
    except OSError as e:  # requests' network errors are OSErrors
        raise RuntimeError(f"tiktoken could not fetch the GPT-2 BPE files (vocab.bpe, encoder.json): {e}\n"
                           f"Run once with network, or set TIKTOKEN_CACHE_DIR to a folder where tiktoken has "
                           f"cached them on another machine.") from None


def main(argv=None):
    parser = argparse.ArgumentParser(description="Tokenize raw text into GPT-2 token shards (val first).")
    parser.add_argument("inputs", nargs="*", help=".txt / .jsonl / .parquet files or folders of them")
    parser.add_argument("--hub", action="store_true", help="tokenize a hub dataset's parquet files")
    parser.add_argument("--hub-repo", help=f"dataset repo for --hub (default {HUB_REPO})")
    parser.add_argument("--hub-folder", help=f"folder in it (default {HUB_FOLDER})")
    parser.add_argument("--out", default=DEFAULT_OUT, help="output folder (default data/fineweb10B)")
    parser.add_argument("--prefix", default="fineweb", help="shard name prefix (default fineweb)")
    parser.add_argument("--shard-size", type=int, default=TOKENS_PER_SHARD,
                        help=f"tokens per shard (default {TOKENS_PER_SHARD})")
    parser.add_argument("--max-shards", type=int, help="stop after this many shards, val included")
    parser.add_argument("--workers", type=int, help="encoding processes (default: all cores)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing shards with the same prefix")
    args = parser.parse_args(argv)
    # Every argument is checked before the tokenizer is loaded (its BPE files may need the network) or a file is read.
    if args.hub == bool(args.inputs):
        parser.error("give input files/folders or --hub (one of the two)")
    if not args.hub and (args.hub_repo or args.hub_folder):
        parser.error("--hub-repo and --hub-folder apply only with --hub")
    if args.shard_size < 1:
        parser.error(f"--shard-size must be at least 1, got {args.shard_size}")
    if args.shard_size > MAX_SHARD_TOKENS:
        parser.error(f"--shard-size must be at most {MAX_SHARD_TOKENS:,} (a shard header counts its tokens in an "
                     f"int32), got {args.shard_size:,}")
    for name in ("max_shards", "workers"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not args.prefix or "/" in args.prefix:
        parser.error(f"--prefix {args.prefix}: a file name prefix without '/' (the folder is --out)")
    check_output_folder(parser, "--out", args.out)
    try:
        if not args.overwrite and os.path.isdir(args.out):
            refuse_existing_shards(args.out, args.prefix)
        files = [] if args.hub else expand_inputs(args.inputs)
        if not args.hub and not files:
            raise ValueError(f"the inputs hold no {', '.join(SUFFIXES[:-1])} or {SUFFIXES[-1]} file")
        parquet = [f"{args.hub_repo or HUB_REPO}/{args.hub_folder or HUB_FOLDER}"] if args.hub else \
            [path for path in files if path.endswith(".parquet")]
        if parquet:
            import_pyarrow_parquet(parquet[0])
    except (OSError, ValueError, ImportError) as e:
        parser.error(str(e))
    try:
        encoder = gpt2_encoding()
        docs = hub_documents(args.hub_repo or HUB_REPO, args.hub_folder or HUB_FOLDER) if args.hub else documents(files)
        paths = tokenize_to_shards(docs, args.out, encoder, args.prefix, args.shard_size, args.workers,
                                   args.max_shards, args.overwrite)
    except (RuntimeError, ImportError, OSError, ValueError) as e:  # each names the file or setting at fault
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {len(paths)} shards to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Download the pre-tokenized FineWeb 10B shards (docs/benchmark.md#data) from the Hugging Face hub into
data/fineweb10B/.

    python data/cached_fineweb10B.py                   # val + the 17 train shards the aurora recipe needs
    python data/cached_fineweb10B.py 8                 # val + the first 8 train shards
    python data/cached_fineweb10B.py --recipe normuon  # val + 18 train shards (3300 steps)
    python data/cached_fineweb10B.py --steps 1000      # val + 6 train shards

Files already complete (valid header, size 1024 + 2N bytes) are skipped; an incomplete one is fetched
again; every file is verified after its download. The hub client's own settings apply: HF_TOKEN,
HF_ENDPOINT (a mirror), HF_HUB_OFFLINE=1 (no network: only check what is already on disk).
"""

import argparse
import os
import sys

from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled,
                                    RemoteEntryNotFoundError, RepositoryNotFoundError)

from shards import (DEFAULT_RECIPE, ShardError, check_output_folder, record_recipe_steps, recipe_steps, shard_filename,
                    train_shards_needed, validate_shard)

REPO_ID = "kjj0/fineweb10B-gpt2"
REPO_TYPE = "dataset"
DEFAULT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fineweb10B")
LAST_TRAIN_SHARD = 103


class DownloadError(RuntimeError):
    """A download that failed; the message says which file, why, and how to retry."""


def shard_filenames(num_train_shards):
    """The val shard, then train shards 1..num_train_shards, as named in the hub repo."""
    if not 0 <= num_train_shards <= LAST_TRAIN_SHARD:
        raise ValueError(f"the dataset has train shards 1..{LAST_TRAIN_SHARD}; asked for {num_train_shards}")
    return [shard_filename("fineweb", index) for index in range(num_train_shards + 1)]


def is_complete(path):
    if not os.path.exists(path):
        return False
    try:
        validate_shard(path)
    except ShardError:
        return False
    return True


def failure_hint(error):
    """What to do about a failed hub call, by the hub's exception class."""
    if isinstance(error, GatedRepoError) or (isinstance(error, HfHubHTTPError) and error.response is not None
                                             and error.response.status_code in (401, 403)):
        return ("the hub refused access: log in with `hf auth login` or set HF_TOKEN to a token that can "
                "read the dataset")
    if isinstance(error, RepositoryNotFoundError):
        return (f"the hub has no dataset {REPO_ID} at {constants.ENDPOINT} (or it is private): check "
                f"HF_ENDPOINT and your token")
    if isinstance(error, RemoteEntryNotFoundError):
        return f"the file is not in {REPO_ID}; check the shard number (train shards are 1..{LAST_TRAIN_SHARD})"
    if isinstance(error, (OfflineModeIsEnabled, LocalEntryNotFoundError)) or constants.HF_HUB_OFFLINE:
        return (f"the hub at {constants.ENDPOINT} could not be reached (no network, or HF_HUB_OFFLINE=1 is "
                f"set) and the file is not on disk")
    return f"the download from {constants.ENDPOINT} failed"


def retry_advice(num_train_shards, local_dir):
    command = f"python data/cached_fineweb10B.py {num_train_shards}"
    if os.path.abspath(local_dir) != DEFAULT_DIR:
        command += f" --dir {local_dir}"
    return "\n".join([
        f"To retry (files already complete are skipped):  {command}",
        f"Behind a firewall, use a mirror:                 HF_ENDPOINT=https://hf-mirror.com {command}",
        f"Without network, with the files copied in place: HF_HUB_OFFLINE=1 {command}   (only verifies them)",
        "Private/gated access:                            hf auth login   (or export HF_TOKEN=...)",
    ])


def hub_error(error):
    """The hub's exception behind `error`: with force_download the hub wraps it in a ValueError."""
    while isinstance(error, ValueError) and error.__cause__ is not None:
        error = error.__cause__
    return error


def fetch_shard(filename, local_dir):
    """Download one shard unless a complete copy is on disk; return (path, downloaded). Raises the hub's
    exceptions on failure and ShardError if the downloaded file is not a valid shard."""
    path = os.path.join(local_dir, filename)
    if is_complete(path):
        return path, False
    # An existing incomplete file would be taken as current by the hub's local-dir metadata; force it.
    path = hf_hub_download(repo_id=REPO_ID, filename=filename, repo_type=REPO_TYPE, local_dir=local_dir,
                           force_download=os.path.exists(path))
    validate_shard(path)
    return path, True


def fetch_shards(num_train_shards, local_dir=DEFAULT_DIR, log=print):
    """Make local_dir hold the val shard and train shards 1..num_train_shards, all verified; return their
    paths. Raises DownloadError naming the file that failed and how to retry."""
    filenames = shard_filenames(num_train_shards)
    os.makedirs(local_dir, exist_ok=True)
    paths = []
    for filename in filenames:
        try:
            path, downloaded = fetch_shard(filename, local_dir)
        except ShardError as e:
            raise DownloadError(f"{e}\nThe downloaded file is not a valid shard; delete it and retry.\n"
                                f"{retry_advice(num_train_shards, local_dir)}") from e
        except (HfHubHTTPError, OfflineModeIsEnabled, LocalEntryNotFoundError, ValueError, OSError) as e:
            cause = hub_error(e)
            raise DownloadError(
                f"could not download {filename} from the {REPO_TYPE} {REPO_ID} into {local_dir}: "
                f"{failure_hint(cause)}.\n  ({type(cause).__name__}: {cause})\n"
                f"{len(paths)} of {len(filenames)} files are complete.\n"
                f"{retry_advice(num_train_shards, local_dir)}") from e
        log(f"{filename}: {'downloaded and verified' if downloaded else 'already complete, skipped'}")
        paths.append(path)
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=f"Download the val shard and the first N train shards of "
                                                 f"{REPO_ID} into data/fineweb10B/.")
    parser.add_argument("num_train_shards", nargs="?", type=int, metavar="N",
                        help=f"train shards to fetch (default: what --recipe needs, {DEFAULT_RECIPE} by default)")
    parser.add_argument("--recipe", choices=sorted(record_recipe_steps()),
                        help=f"fetch the shards this recipe's step count needs (default {DEFAULT_RECIPE})")
    parser.add_argument("--steps", type=int, help="fetch the shards this many steps need (overrides --recipe)")
    parser.add_argument("--dir", default=DEFAULT_DIR, help="where to put the shards (default data/fineweb10B)")
    args = parser.parse_args(argv)
    if args.num_train_shards is not None and args.steps is not None:
        parser.error("give either N or --steps, not both")
    if args.num_train_shards is not None and args.recipe is not None:
        parser.error("give either N or --recipe, not both")
    # Everything is checked before the hub is contacted or any folder is made (the hub client makes DIR/.cache).
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if args.num_train_shards is not None:
        num_train_shards, asked = args.num_train_shards, f"N {args.num_train_shards}"
    else:
        steps = args.steps if args.steps is not None else recipe_steps(args.recipe or DEFAULT_RECIPE)
        num_train_shards = train_shards_needed(steps)
        asked = f"--steps {steps} needs {num_train_shards} train shards"
    if not 0 <= num_train_shards <= LAST_TRAIN_SHARD:
        parser.error(f"{asked}; the dataset has train shards 1..{LAST_TRAIN_SHARD}")
    check_output_folder(parser, "--dir", args.dir)
    if args.num_train_shards is None:
        print(f"{steps} steps need {num_train_shards} train shards")
    try:
        fetch_shards(num_train_shards, args.dir)
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.dir}: val shard and {num_train_shards} train shards complete")
    return 0


if __name__ == "__main__":
    sys.exit(main())

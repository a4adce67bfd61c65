"""Token shards (docs/benchmark.md#data): the one reader, writer and validator for the data scripts, the
arithmetic of how many train shards a run needs, and a command that checks a data folder.

    python data/shards.py data/fineweb10B                  # list, check against the default recipe
    python data/shards.py data/fineweb10B --recipe muon
    python data/shards.py --tiny                           # data/synthetic against the CPU preset
    python data/shards.py data/synthetic --steps 300 --batch-tokens 8192 --val-tokens 65536

Exit status 0 when every shard is valid and there are enough tokens for the run, 1 otherwise, 2 when the folder
is missing, not a folder or cannot be listed.
"""

import argparse
import functools
import math
import os
import sys
from dataclasses import dataclass

import numpy as np

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_BYTES = 2  # uint16
MAX_TOKEN_ID = np.iinfo(np.uint16).max
MAX_SHARD_TOKENS = np.iinfo(np.int32).max  # the header counts the tokens in an int32
MAX_SHARD_INDEX = 999_999  # shard names number them with 6 digits

TOKENS_PER_SHARD = 100_000_000  # every published FineWeb shard but the last
BATCH_TOKENS = 524_288  # tokens per optimizer step (docs/benchmark.md#training-loop)
VAL_TOKENS = 20 * BATCH_TOKENS  # the validation slice of the val shard (docs/benchmark.md#data)
DEFAULT_RECIPE = "aurora"


@functools.cache
def trainer():
    """train_gpt, imported on first use: the step arithmetic and recipe step counts follow the trainer's
    own, and importing it loads torch, which reading and writing shards do not need."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import train_gpt
    return train_gpt


def record_recipe_steps():
    """T of each record recipe (docs/recipes.md), read from the trainer's recipe table so that the number of
    shards to fetch follows the recipes the trainer actually runs."""
    return {name: recipe.steps for name, recipe in trainer().RECIPES.items()}


class ShardError(ValueError):
    """A shard file not in the format of docs/benchmark.md#data; the message names the file and the problem."""

    def __init__(self, path, problem):
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


def shard_filename(prefix, index):
    """The name of shard `index` in a set: 0 is the val shard ({prefix}_val_000000.bin), train shards are
    numbered from 1 ({prefix}_train_000001.bin, ...), as in FineWeb."""
    role = "val" if index == 0 else "train"
    return f"{prefix}_{role}_{index:06d}.bin"


def nearest_existing(path):
    """`path` itself if it exists, else its closest ancestor that does: where a missing folder would be made."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def output_folder_problem(folder):
    """Why files cannot be written into `folder`, made first if missing, or None. Checked before any work, so that
    a bad folder is one error line and not a traceback once the work is done."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        return f"{folder} is a file, not a folder"
    existing = nearest_existing(folder)
    if not os.path.isdir(existing):
        return f"{existing} is a file, so no folder can be made below it"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"the folder {existing} is not writable"
    return None


def check_output_folder(parser, flag, folder):
    """parser.error (one error line, exit 2) unless files can be written into `folder`."""
    problem = output_folder_problem(folder)
    if problem:
        parser.error(f"{flag} {folder}: {problem}; choose another {flag}")


def shard_file_size(num_tokens):
    """Bytes of a complete shard holding num_tokens tokens."""
    return HEADER_BYTES + TOKEN_BYTES * num_tokens


def shard_header(num_tokens):
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, VERSION, num_tokens
    return header


def write_shard(path, tokens):
    """Write tokens (any integer array with ids in [0, 65535]) as one shard. The file appears under its
    final name only once complete (written next to it, then renamed), so a crash never leaves a
    half-written shard that looks finished."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"{path}: tokens must be a 1-D array, got shape {tokens.shape}")
    if tokens.size > MAX_SHARD_TOKENS:
        raise ValueError(f"{path}: {tokens.size:,} tokens, more than a shard's header can count ({MAX_SHARD_TOKENS:,})")
    if tokens.size and (tokens.min() < 0 or tokens.max() > MAX_TOKEN_ID):
        raise ValueError(f"{path}: token ids must lie in [0, {MAX_TOKEN_ID}] to fit uint16, "
                         f"got [{tokens.min()}, {tokens.max()}]")
    partial = f"{path}.partial"
    with open(partial, "wb") as f:
        f.write(shard_header(tokens.size).tobytes())
        f.write(tokens.astype("<u2").tobytes())
    os.replace(partial, path)


def read_header(path):
    return np.fromfile(path, dtype="<i4", count=HEADER_INTS)


def validate_shard(path):
    """Check the header and the file size; return the token count N. Raises ShardError."""
    file_size = os.path.getsize(path)
    if file_size < HEADER_BYTES:
        raise ShardError(path, f"file is {file_size} bytes, shorter than the {HEADER_BYTES}-byte header")
    header = read_header(path)
    if header[0] != MAGIC:
        raise ShardError(path, f"bad magic number {header[0]} (expected {MAGIC}); not a token shard")
    if header[1] != VERSION:
        raise ShardError(path, f"unsupported version {header[1]} (expected {VERSION})")
    num_tokens = int(header[2])
    if num_tokens < 0:
        raise ShardError(path, f"negative token count {num_tokens} in the header")
    expected = shard_file_size(num_tokens)
    if file_size < expected:
        raise ShardError(path, f"truncated: the header says {num_tokens} tokens ({expected} bytes) "
                               f"but the file has {file_size} bytes; download or write it again")
    if file_size > expected:
        raise ShardError(path, f"{file_size - expected} bytes after the {num_tokens} tokens the header "
                               f"announces ({expected} bytes); the file is not a single shard")
    return num_tokens


def read_shard(path):
    """The tokens of a validated shard as a uint16 array."""
    num_tokens = validate_shard(path)
    return np.fromfile(path, dtype="<u2", count=num_tokens, offset=HEADER_BYTES).astype(np.uint16)




def steps_in_shard(num_tokens, batch=BATCH_TOKENS):
    """Optimizer steps one train shard feeds under the stream rule of docs/benchmark.md#data, as the trainer
    counts them (a shard of batch + 1 tokens or fewer feeds none; 190 for a 100M-token shard)."""
    return trainer().steps_in_shard(num_tokens, batch)


def train_shards_needed(steps, tokens_per_shard=TOKENS_PER_SHARD, batch=BATCH_TOKENS):
    """Train shards of tokens_per_shard tokens that a run of `steps` optimizer steps reads
    (17 for 3200 steps, 18 for 3300 at full size)."""
    per_shard = steps_in_shard(tokens_per_shard, batch)
    if per_shard == 0:
        raise ValueError(f"a shard of {tokens_per_shard} tokens cannot fill one step of {batch + 1} tokens")
    return math.ceil(steps / per_shard)


def recipe_steps(recipe):
    steps = record_recipe_steps()
    if recipe not in steps:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {', '.join(steps)}")
    return steps[recipe]


@dataclass
class ShardStatus:
    path: str
    num_tokens: int | None  # None when invalid
    error: str | None
    highest_id: int | None = None  # None when invalid or empty
    header: tuple[int, ...] | None = None  # None when invalid


def inspect_shard(path, vocab_size):
    """The shard's status: its header and size valid (validate_shard), and every token id below vocab_size (the
    model has no embedding row for a larger one: tokenized for another vocabulary, and the trainer refuses it)."""
    try:
        tokens = read_shard(path)
    except ShardError as e:
        return ShardStatus(path, None, e.problem)
    except OSError as e:
        return ShardStatus(path, None, f"cannot read it: {e.strerror or e}")
    highest = int(tokens.max()) if tokens.size else None
    if highest is not None and highest >= vocab_size:
        return ShardStatus(path, None, f"token id {highest}, but the vocabulary has {vocab_size} ids "
                                       f"(0..{vocab_size - 1}); tokenized for another vocabulary")
    return ShardStatus(path, tokens.size, None, highest, tuple(int(v) for v in read_header(path)))


def disagreements(statuses):
    """What the valid shards of one folder disagree on, as problem lines. Every shard of a set holds its
    vocabulary's end-of-text id, its highest id (511 with 512 ids, GPT-2's 50256), so different highest ids mean
    shards written for different vocabularies, as a second write into the folder can leave; and their headers
    must be the same but for the token count."""
    valid = [s for s in statuses if s.num_tokens is not None]
    problems = []
    names_by_highest = {}
    for status in valid:
        if status.highest_id is not None:
            names_by_highest.setdefault(status.highest_id, []).append(os.path.basename(status.path))
    if len(names_by_highest) > 1:
        groups = "; ".join(f"{highest} in {', '.join(names)}" for highest, names in sorted(names_by_highest.items()))
        problems.append(f"the shards disagree on their highest token id (their vocabulary's end-of-text id), so they "
                        f"were written for different vocabularies: {groups}; write the set again")
    for status in valid[1:]:
        reference = valid[0]  # the val shard when it is valid: the first in streaming order
        differing = [i for i, (a, b) in enumerate(zip(status.header, reference.header)) if a != b and i != 2]
        if differing:
            i = differing[0]
            problems.append(f"the shard headers disagree beyond the token count (another writer or format version): "
                            f"{os.path.basename(status.path)} differs from {os.path.basename(reference.path)} at "
                            f"header int {i} ({status.header[i]}, not {reference.header[i]}); write the set again")
    return problems


def shard_role(filename):
    """'val' or 'train' from the file name (…_val_000000.bin, …_train_000001.bin), None otherwise."""
    for role in ("val", "train"):
        if f"_{role}_" in filename:
            return role
    return None


def inspect_folder(folder, vocab_size):
    """Status of every .bin shard in folder (inspect_shard), grouped by role,
    each group in sorted filename order (the order the trainer streams them)."""
    groups = {"val": [], "train": [], "other": []}
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".bin"):
            continue
        groups[shard_role(name) or "other"].append(inspect_shard(os.path.join(folder, name), vocab_size))
    return groups


def steps_available(train_statuses, batch=BATCH_TOKENS):
    """Steps the train stream can feed before it reaches the first invalid shard (the trainer stops
    there)."""
    total = 0
    for status in train_statuses:
        if status.num_tokens is None:
            break
        total += steps_in_shard(status.num_tokens, batch)
    return total


def folder_report(folder, steps, batch, val_tokens, vocab_size):
    """(report lines, ok): every shard with its token count and validity, then whether the folder
    holds enough valid data for `steps` steps of `batch` tokens and a val slice of val_tokens, in a
    vocabulary of vocab_size ids."""
    groups = inspect_folder(folder, vocab_size)
    lines, problems = [], []
    for role in ("val", "train", "other"):
        for status in groups[role]:
            name = os.path.basename(status.path)
            if status.num_tokens is None:
                lines.append(f"  {role:5s} {name}  INVALID: {status.error}")
                problems.append(f"{name} is invalid")
            else:
                lines.append(f"  {role:5s} {name}  {status.num_tokens:,} tokens  ok")
    val = groups["val"]
    if not val:
        problems.append("no val shard (*_val_*.bin)")
    elif val[0].num_tokens is not None and val[0].num_tokens < val_tokens:
        problems.append(f"val shard has {val[0].num_tokens:,} tokens, fewer than the {val_tokens:,} "
                        f"validation reads")
    available = steps_available(groups["train"], batch)
    train_tokens = sum(s.num_tokens for s in groups["train"] if s.num_tokens is not None)
    lines.append(f"{len(groups['train'])} train shards, {train_tokens:,} tokens: {available} steps of "
                 f"{batch:,} tokens; the run needs {steps}")
    if available < steps:
        problems.append(f"train shards feed {available} steps, the run needs {steps}")
    problems += disagreements([status for group in groups.values() for status in group])
    lines.extend(f"NOT ENOUGH / INVALID: {p}" for p in problems)
    if not problems:
        lines.append("OK: valid and enough for the run")
    return lines, not problems


def main(argv=None):
    parser = argparse.ArgumentParser(description="List a folder's token shards, check them, and say "
                                                 "whether they are enough for a recipe.")
    parser.add_argument("folder", nargs="?",
                        help="default: data/fineweb10B, or data/synthetic with --tiny")
    parser.add_argument("--tiny", action="store_true",
                        help="check against the trainer's CPU preset (python train_gpt.py --tiny) instead of the "
                             "full-size benchmark")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--recipe", choices=sorted(record_recipe_steps()), default=DEFAULT_RECIPE,
                       help=f"record recipe whose step count to check against (default {DEFAULT_RECIPE}; "
                            f"the CPU preset runs every recipe for the same steps)")
    which.add_argument("--steps", type=int, help="check against this many steps instead of a recipe")
    parser.add_argument("--batch-tokens", type=int,
                        help=f"tokens per step (default {BATCH_TOKENS}, or the CPU preset's with --tiny)")
    parser.add_argument("--val-tokens", type=int,
                        help=f"tokens the validation reads from the val shard (default {VAL_TOKENS}, or the "
                             f"CPU preset's with --tiny)")
    parser.add_argument("--vocab-size", type=int,
                        help="token ids must lie below this (default: the model's, 50304, or 512 with --tiny)")
    args = parser.parse_args(argv)
    for name in ("steps", "batch_tokens", "val_tokens", "vocab_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    # The trainer's own presets, so the check follows what `train_gpt.py [--tiny]` will read.
    preset = trainer().TINY if args.tiny else trainer().FULL
    folder = args.folder or os.path.join(os.path.dirname(__file__), "synthetic" if args.tiny else "fineweb10B")
    steps = args.steps if args.steps is not None else preset.steps or recipe_steps(args.recipe)
    batch_tokens = args.batch_tokens or preset.batch_tokens
    val_tokens = args.val_tokens or preset.val_tokens
    vocab_size = args.vocab_size or preset.model.vocab_size
    if os.path.exists(folder) and not os.path.isdir(folder):
        print(f"error: {folder} is a file, not a folder; pass the folder that holds the shards", file=sys.stderr)
        return 2
    try:
        lines, ok = folder_report(folder, steps, batch_tokens, val_tokens, vocab_size)
    except FileNotFoundError:
        print(f"error: {folder}: no such folder; fetch FineWeb with `python data/cached_fineweb10B.py` or write "
              f"synthetic shards with `python data/synthetic.py`", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {folder}: cannot list it: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"{folder}: checked against {'the CPU preset (--tiny)' if args.tiny else 'the full-size benchmark'}")
    print("\n".join(lines))
    if not ok and not args.tiny:
        print("(shards for the CPU preset, such as data/synthetic, are checked with --tiny)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

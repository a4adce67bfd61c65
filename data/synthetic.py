"""Deterministic synthetic token shards for machines without FineWeb (the trainer's CPU preset, tests).

    python data/synthetic.py                     # data/synthetic/: val 1M tokens, 2 train shards of 2M
    python data/synthetic.py --vocab-size 50257  # same language over GPT-2's vocabulary (EOT 50256)

The language: documents, each opened by EOT (id V-1) and assigned one of a few hidden topics. Inside a
document every token follows from the previous token and the topic: each (topic, previous token) has
SUCCESSORS candidate next tokens drawn at random once from the seed, and the next token is the
candidate at a Zipf-distributed rank. A document ends with probability END_PROBABILITY per token.
Unigram frequencies are nearly flat (entropy close to log V), the previous token alone already tells
much (a bigram model's loss), and the topic, readable from the context, tells more; the entropy rate is
about 3.0 nats against log(512) = 6.24. Same seed and sizes -> identical bytes; shard k depends only on
the seed, its index and its size, so adding train shards leaves the others unchanged.
"""

import argparse
import glob
import math
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from shards import (MAX_SHARD_INDEX, MAX_SHARD_TOKENS, check_output_folder, nearest_existing, shard_file_size,
                    shard_filename, write_shard)

PREFIX = "synthetic"
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), PREFIX)
DEFAULT_VOCAB_SIZE = 512
DEFAULT_TRAIN_SHARDS = 2
DEFAULT_TOKENS_PER_SHARD = 2_000_000
DEFAULT_VAL_TOKENS = 1_000_000

TOPICS = 4
SUCCESSORS = 64  # candidate next tokens per (topic, previous token)
ZIPF_EXPONENT = 1.2
END_PROBABILITY = 1 / 128  # documents are 128 tokens long on average
PARALLEL_DOCUMENT_STREAMS = 4096  # independent streams generated side by side, then concatenated
MIN_STREAM_LENGTH = 1024  # each stream starts a fresh document; long streams keep that rare


def zipf_probabilities(num_ranks, exponent=ZIPF_EXPONENT):
    weights = 1.0 / np.arange(1, num_ranks + 1) ** exponent
    return weights / weights.sum()


def successor_table(vocab_size, seed):
    """table[topic, previous token, rank] -> next token, ids in [0, V-1) (never EOT). Drawn with
    replacement, so a row may repeat a token; that only merges two ranks' probabilities."""
    rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(1)[0])
    return rng.integers(0, vocab_size - 1, size=(TOPICS, vocab_size, SUCCESSORS), dtype=np.int64)


def generate_stream(table, num_tokens, rng):
    """num_tokens tokens of the language: PARALLEL_DOCUMENT_STREAMS streams advanced together one
    position at a time (the chain is sequential along a stream, vectorised across streams), each
    starting with EOT, then laid end to end (a stream's last document is cut short)."""
    vocab_size = table.shape[1]
    eot = vocab_size - 1
    length = max(MIN_STREAM_LENGTH, math.ceil(num_tokens / PARALLEL_DOCUMENT_STREAMS))
    num_streams = math.ceil(num_tokens / length)
    last_token = num_tokens - 1 - (num_streams - 1) * length  # where the output ends in the last stream
    # Every random draw is made up front; the loop below only looks them up.
    ranks = np.searchsorted(np.cumsum(zipf_probabilities(SUCCESSORS)), rng.random((length, num_streams)))
    ranks = np.minimum(ranks, SUCCESSORS - 1)  # guards the last cumsum entry rounding below 1.0
    ends = rng.random((length, num_streams)) < END_PROBABILITY
    # Neither a stream nor the output ends with EOT, so no empty document where streams or shards meet;
    # every stream starts with one.
    ends[-1] = False
    ends[last_token, -1] = False
    ends[0] = True
    new_topics = rng.integers(0, TOPICS, size=(length, num_streams))
    streams = np.empty((length, num_streams), dtype=np.int64)
    topic = new_topics[0]
    previous = np.full(num_streams, eot)
    for t in range(length):
        end = ends[t] & (previous != eot) if t else ends[t]  # no empty documents
        topic = np.where(end, new_topics[t], topic)
        previous = np.where(end, eot, table[topic, previous, ranks[t]])
        streams[t] = previous
    return streams.T.reshape(-1)[:num_tokens]


def entropy_rate(table):
    """Nats per token of the language given the hidden topic (what a perfect model could reach) with this
    successor table: a document ends or not, a new one draws its topic, and otherwise the next token is
    Zipf-drawn from the (topic, previous token) row, whose ranks that drew the same token are one outcome.
    The rows are weighted alike (unigram frequencies are nearly flat). A vocabulary of V ids has V - 1
    successors, so a small one merges many ranks (V = 2: one successor, no choice at all)."""
    p = zipf_probabilities(SUCCESSORS)
    order = np.argsort(table, axis=-1, kind="stable")
    tokens, probabilities = np.take_along_axis(table, order, axis=-1), p[order]
    # Along each sorted row, one outcome per run of equal tokens: its probability is the run's sum.
    last_of_run = np.ones(tokens.shape, dtype=bool)
    last_of_run[..., :-1] = tokens[..., 1:] != tokens[..., :-1]
    sums = np.cumsum(probabilities.reshape(-1))[last_of_run.reshape(-1)]  # rows end runs, so rows never mix
    outcomes = np.diff(sums, prepend=0.0)
    successor_entropy = -(outcomes * np.log(outcomes)).sum() / (tokens.size // SUCCESSORS)
    q = END_PROBABILITY
    end_entropy = -(q * math.log(q) + (1 - q) * math.log(1 - q))
    return end_entropy + (1 - q) * successor_entropy + q * math.log(TOPICS)


def conditional_entropy(tokens, order, vocab_size):
    """Empirical (plug-in) entropy in nats of a token given the `order` tokens before it: the loss of
    the best order-gram model fitted to these very tokens. order=0 is the unigram entropy."""
    tokens = np.asarray(tokens, dtype=np.int64)
    n = tokens.size - order
    context = np.zeros(n, dtype=np.int64)
    for k in range(order):
        context = context * vocab_size + tokens[k:k + n]
    joint = context * vocab_size + tokens[order:]
    _, joint_counts = np.unique(joint, return_counts=True)
    _, context_counts = np.unique(context, return_counts=True)
    # H(next | context) = H(context, next) - H(context), each from its own counts.
    def entropy(counts):
        p = counts / n
        return float(-(p * np.log(p)).sum())
    return entropy(joint_counts) - entropy(context_counts)


def write_synthetic_shards(out_dir=DEFAULT_OUT, vocab_size=DEFAULT_VOCAB_SIZE,
                           train_shards=DEFAULT_TRAIN_SHARDS, tokens_per_shard=DEFAULT_TOKENS_PER_SHARD,
                           val_tokens=DEFAULT_VAL_TOKENS, seed=0):
    """Write synthetic_val_000000.bin and synthetic_train_000001.bin ... into out_dir as one set; return the
    paths, val first. Token ids lie in [0, vocab_size) and EOT is vocab_size - 1. The set is written into a
    hidden folder inside out_dir, then takes the place of every synthetic_{val,train}_*.bin there, so no shard
    of an earlier set (more shards, another vocabulary) is left beside it, and a failure leaves the earlier set
    as it was. Other files in out_dir stay."""
    if not 2 <= vocab_size <= 65536:
        raise ValueError(f"vocab_size must be in [2, 65536] (uint16 shards), got {vocab_size}")
    if min(train_shards, tokens_per_shard, val_tokens) < 1:
        raise ValueError("train_shards, tokens_per_shard and val_tokens must all be at least 1")
    created = not os.path.isdir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{PREFIX}-", dir=out_dir)
    try:
        table = successor_table(vocab_size, seed)
        # Child 0 of the seed builds the table; child 1 + k writes shard k (0 = val).
        shard_seeds = np.random.SeedSequence(seed).spawn(2 + train_shards)[1:]
        names = [shard_filename(PREFIX, index) for index in range(len(shard_seeds))]
        for index, shard_seed in enumerate(shard_seeds):
            size = val_tokens if index == 0 else tokens_per_shard
            tokens = generate_stream(table, size, np.random.default_rng(shard_seed))
            write_shard(os.path.join(staging, names[index]), tokens)
        for role in ("val", "train"):
            for old in glob.glob(os.path.join(glob.escape(out_dir), f"{PREFIX}_{role}_*.bin")):
                os.remove(old)
        for name in names:
            os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not os.listdir(out_dir):
            os.rmdir(out_dir)
    return [os.path.join(out_dir, name) for name in names]


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write deterministic synthetic token shards.")
    parser.add_argument("--out", default=DEFAULT_OUT, help="output folder (default data/synthetic)")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE,
                        help=f"V: ids in [0, V), EOT = V-1 (default {DEFAULT_VOCAB_SIZE})")
    parser.add_argument("--train-shards", type=int, default=DEFAULT_TRAIN_SHARDS)
    parser.add_argument("--tokens-per-shard", type=int, default=DEFAULT_TOKENS_PER_SHARD,
                        help="tokens per train shard")
    parser.add_argument("--val-tokens", type=int, default=DEFAULT_VAL_TOKENS, help="tokens in the val shard")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    # Checked here, before anything is written, so a bad value is one error line and not a traceback.
    if not 2 <= args.vocab_size <= 65536:
        parser.error(f"--vocab-size must be in [2, 65536] (ids are stored as uint16), got {args.vocab_size}")
    for name in ("train_shards", "tokens_per_shard", "val_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name, most, why in (("train_shards", MAX_SHARD_INDEX, "shard names have 6 digits"),
                            ("tokens_per_shard", MAX_SHARD_TOKENS, "a shard header counts its tokens in an int32"),
                            ("val_tokens", MAX_SHARD_TOKENS, "a shard header counts its tokens in an int32")):
        if getattr(args, name) > most:
            parser.error(f"--{name.replace('_', '-')} must be at most {most:,} ({why}), got {getattr(args, name):,}")
    if args.seed < 0:
        parser.error(f"--seed must be 0 or more (numpy seeds are non-negative), got {args.seed}")
    check_output_folder(parser, "--out", args.out)
    needed = shard_file_size(args.val_tokens) + args.train_shards * shard_file_size(args.tokens_per_shard)
    free = shutil.disk_usage(nearest_existing(args.out)).free
    if needed > free:
        parser.error(f"--out {args.out}: the shards take {needed / 1e6:,.0f} MB, more than the {free / 1e6:,.0f} MB "
                     f"free there; write fewer or smaller shards")
    start = time.perf_counter()
    try:
        paths = write_synthetic_shards(args.out, args.vocab_size, args.train_shards, args.tokens_per_shard,
                                       args.val_tokens, args.seed)
    except (OSError, MemoryError) as e:  # the disk or memory ran out while writing: the earlier set is untouched
        print(f"error: writing the shards into {args.out}: {e}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start
    total = args.val_tokens + args.train_shards * args.tokens_per_shard
    print(f"wrote {len(paths)} shards ({total:,} tokens) to {args.out} in {seconds:.1f}s")
    print(f"entropy (nats/token): log(V) = {math.log(args.vocab_size):.3f}, "
          f"language given its topics = {entropy_rate(successor_table(args.vocab_size, args.seed)):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

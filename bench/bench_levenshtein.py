"""Benchmark label.py's numpy Levenshtein alignment against its textbook DP (plain Python), on one
core.

Prints pairs per CPU second (time.process_time: the figures hold on a busy machine) for 64-, 256-
and 512-token pairs (random ids; the second sequence is the first with ~15% of its tokens
substituted, deleted or inserted, like a minimal revision) for:
    python   label.levenshtein, the textbook double-loop DP with its backtrace (the baseline),
    single   label.levenshtein_batch on one pair per call (numpy over each DP row),
    batched  label.levenshtein_batch over label.group_batches, as label.py runs it (pairs of
             similar length grouped, numpy over rows of many pairs at once),
    labels   label.align_all: batched, plus the labels from each edit script (what label.py does),
and the speed-ups over the baseline (the first three all return the distance and the edit script).
Then it times the whole reviser-free path of label.py (tokenise, boundary check, align, label) on
the bundled hh-rlhf pairs, with the chosen response as the revision, and extrapolates to the 45,000
pairs of the paper's 40% split.

    python bench/bench_levenshtein.py                 # pinned to core 0
    python bench/bench_levenshtein.py --tokenizer runs/demo/sft --workers 2
"""
import argparse
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one core means one core
os.environ.setdefault("RAYON_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
import label  # noqa: E402
from plumbing import hf_models  # noqa: E402


def revision_like(n, rng, vocab=50257, edit_rate=0.15):
    a = [rng.randrange(vocab) for _ in range(n)]
    b = list(a)
    for _ in range(int(n * edit_rate)):
        k, pos = rng.randrange(3), rng.randrange(len(b))
        if k == 0:
            b[pos] = rng.randrange(vocab)
        elif k == 1:
            del b[pos]
        else:
            b.insert(pos, rng.randrange(vocab))
    return a, b


def rate(fn, items, min_time=1.0):
    """Items per CPU second of this process (robust to other processes sharing the core),
    repeating fn over items until min_time CPU seconds have passed."""
    done, start = 0, time.process_time()
    while True:
        fn(items)
        done += len(items)
        elapsed = time.process_time() - start
        if elapsed >= min_time:
            return done / elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--core", type=int, default=0, help="CPU core to pin to (-1: do not pin)")
    parser.add_argument("--tokenizer", default=None,
                        help="policy tokenizer dir (default: a BPE trained here, 8192 ids)")
    parser.add_argument("--workers", type=int, default=1,
                        help="also time the full path with this many processes (wall clock; give "
                             "--core -1)")
    parser.add_argument("--min-time", type=float, default=2.0, help="seconds per measurement")
    args = parser.parse_args()
    if args.core >= 0 and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.core})
    rng = random.Random(0)

    print(f"{'tokens':>6} {'python':>10} {'single':>10} {'batched':>10} {'labels':>10} "
          f"{'single/py':>10} {'batched/py':>11} {'labels/py':>10}")
    for n in (64, 256, 512):
        pairs = [revision_like(n, rng) for _ in range(max(16, 16384 // n))]
        few = pairs[: 8 if n < 512 else 4]
        assert [label.levenshtein(a, b) for a, b in few] == label.levenshtein_batch(few)
        py = rate(lambda items: [label.levenshtein(a, b) for a, b in items], few, args.min_time)
        single = rate(lambda items: [label.levenshtein_batch([pair]) for pair in items], pairs[:32],
                      args.min_time)
        batched = rate(
            lambda items: [
                label.levenshtein_batch([items[k] for k in batch])
                for batch in label.group_batches(items)
            ],
            pairs,
            args.min_time,
        )
        labels = rate(lambda items: label.align_all(items, progress=False), pairs, args.min_time)
        print(f"{n:>6} {py:>8.1f}/s {single:>8.1f}/s {batched:>8.1f}/s {labels:>8.1f}/s "
              f"{single / py:>9.1f}x {batched / py:>10.1f}x {labels / py:>9.1f}x", flush=True)

    # the whole reviser-free path on real pairs
    pairs = common.load_pairs(common.BUNDLED_DATA, quiet=True)
    if args.tokenizer:
        tokenizer = hf_models.load_tokenizer(args.tokenizer)
    else:
        tokenizer = hf_models.train_tiny_tokenizer([p.prompt + p.chosen for p in pairs],
                                                   vocab_size=8192)
    revisions = {p.id: p.chosen for p in pairs}
    for workers in sorted({1, args.workers}):
        # one process: CPU seconds (one core, whatever else runs); several: wall-clock seconds
        clock = time.process_time if workers == 1 else time.perf_counter
        start = clock()
        records, _ = label.label_pairs(pairs, revisions, tokenizer, workers=workers, progress=False)
        total = clock() - start
        id_pairs = [(r["rejected_ids"], r["revised_ids"]) for r in records]
        start = clock()
        label.align_all(id_pairs, workers=workers, progress=False)
        align = clock() - start
        lengths = [len(r["rejected_ids"]) + len(r["revised_ids"]) for r in records]
        print(
            f"bundled hh-rlhf, {len(pairs)} pairs (mean {sum(lengths) / len(lengths) / 2:.0f} "
            "tokens per response, "
            f"cut at 255), workers={workers} ({'CPU' if workers == 1 else 'wall'} time): "
            f"{len(pairs) / total:.0f} pairs/s (alignment alone {len(pairs) / align:.0f} pairs/s); "
            f"45,000 pairs: {45000 * total / len(pairs):.0f} s (alignment "
            f"{45000 * align / len(pairs):.0f} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()

"""The lab's reward models as RED reads them, beside TLCR's discriminators, on held-out data.

For each reward model (name=DIR) it prints and writes (--out, JSON):
    acc_rl, acc_test   pair accuracy on the gold-ranked pairs of the RL and test splits (held out:
                       the reward model trains on the reward split)
    r_test             Pearson r between R(x, y) and gold(y) over the held-out replies: the test
                       split's chosen and rejected replies and the rule revision of each
                       gold-rejected one (eval.py --gold's set), cut to --max-response-len tokens
    red                RED's token rewards R(x, y≤t) − R(x, y≤t−1) against the gold credit of each
                       token (gold.token_credit, gold.credit_metrics): auc_harm, auc_safe, word_r
    prefix_r           how R(x, y≤t) tracks gold(y≤t) along a reply: the mean over the held-out
                       replies whose prefix gold varies of the Pearson r between the two along the
                       reply (the empty prefix, read at the last prompt token, included)
    step_r             Pearson r over all held-out tokens between RED's reward and the change of the
                       prefix gold at that token, gold(y≤t) − gold(y≤t−1): what RED should equal
and for each discriminator (name=DIR) the credit metrics of TLCR's 2D − 1 and r(Σ_t (2D − 1), gold).
With --samples FILE (gold_samples.py --split rl: replies of the SFT policy to prompts no reward
model trained on), also acc_samples and r_samples on those pairs and their distinct replies.

    python bench/lab_reward_model.py --reward-models pairs=runs/gold-demo/reward_model \\
        --discriminators tlcr=runs/gold-demo/discriminator --out runs/gold-demo/lab_rm.json
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
import discriminator as disc  # noqa: E402
import eval as ev  # noqa: E402
import gold  # noqa: E402
import plumbing  # noqa: E402
import redistribute as red  # noqa: E402
from plumbing import checkpoint, hf_models  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=plumbing.HelpFormatter)
    parser.add_argument("--reward-models", nargs="*", default=[], metavar="NAME=DIR",
                        help="reward models")
    parser.add_argument("--discriminators", nargs="*", default=[], metavar="NAME=DIR",
                        help="TLCR discriminators")
    parser.add_argument("--data", default="bundled",
                        help="the preference pairs (their RL and test splits)")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the data split")
    parser.add_argument("--samples", default=None,
                        help="gold_samples.py --split rl output (optional)")
    parser.add_argument("--max-prompt-len", type=int, default=192,
                        help="prompt tokens kept (the last ones)")
    parser.add_argument("--max-response-len", type=int, default=96,
                        help="response tokens kept, EOS included")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per forward pass")
    parser.add_argument("--out", default=None, help="JSON file for the figures")
    return parser.parse_args(argv)


def named(items):
    return dict(item.split("=", 1) for item in items)


# ----------------------------------------------------------------------------------------------
# the held-out data
# ----------------------------------------------------------------------------------------------
def heldout_replies(pairs):
    """(prompt pair, reply) of eval.py --gold's held-out replies (eval.heldout_replies), and how
    many of each kind."""
    rows = ev.heldout_replies(pairs)
    kinds = {kind: sum(k == kind for k, _, _ in rows) for kind in ("chosen", "rejected", "revised")}
    return [(pair, reply) for _, pair, reply in rows], kinds


def encode_rows(rows, tokenizer, args):
    """(prompt ids, response ids with EOS) per (pair, reply) row."""
    return [
        (
            common.encode_prompt(
                tokenizer, common.prompt_text(tokenizer, p.prompt, p.messages), args.max_prompt_len
            ),
            common.encode_response(
                tokenizer, common.response_text(tokenizer, reply, p.messages), args.max_response_len
            ),
        )
        for p, reply in rows
    ]


# ----------------------------------------------------------------------------------------------
# scores at every position, one forward pass per batch
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def position_scores(model, encoded, batch_size, desc):
    """Per row, the model's output at the last prompt token and at every response token [1 + R].
    Rows are padded with the model's own pad id (a saved reward model may have added one)."""
    pad_id = model.config.pad_token_id or 0
    out = []
    for start in tqdm(range(0, len(encoded), batch_size), desc=desc, leave=False):
        chunk = encoded[start : start + batch_size]
        query_response, attention_mask, _ = common.collate_right(chunk, pad_id)  # [B, T]
        scores = model(query_response, attention_mask).float()  # [B, T]
        for row, (prompt, response) in zip(scores, chunk):
            out.append(row[len(prompt) - 1 : len(prompt) + len(response)].numpy())
    return out


def prefix_gold(tokenizer, rows, encoded):
    """gold(y≤t) at the empty prefix and after each response token (red.prefix_gold_scores)."""
    return [
        np.array(
            [0]
            + red.prefix_gold_scores(
                tokenizer, common.response_text(tokenizer, reply, p.messages), len(response)
            ),
            dtype=float,
        )
        for (p, reply), (_, response) in zip(rows, encoded)
    ]


def pair_accuracy(model, pairs, tokenizer, args):
    encoded = encode_rows([(p, p.chosen) for p in pairs] + [(p, p.rejected) for p in pairs],
                          tokenizer, args)
    scores = [
        s[-1]
        for s in position_scores(model, encoded, args.batch_size, "pairs")
    ]
    return float(np.mean(np.array(scores[: len(pairs)]) > np.array(scores[len(pairs) :])))


def reward_model_figures(model, tokenizer, heldout, samples, args):
    encoded, credit, prefix = heldout["encoded"], heldout["credit"], heldout["prefix"]
    scores = position_scores(model, encoded, args.batch_size, "held-out replies")
    red_rewards = [
        np.diff(s) for s in scores
    ]  # eq. 6: R(x, y≤t) − R(x, y≤t−1), R(x, y≤−1) at the prompt
    pooled = gold.pool_replies(
        (r, c["credit"], c["word_of_token"]) for r, c in zip(red_rewards, credit)
    )
    tracking = [gold.pearson(s, g) for s, g in zip(scores, prefix) if g.std() > 0]
    figures = {
        "acc_rl": pair_accuracy(model, heldout["rl_pairs"], tokenizer, args),
        "acc_test": pair_accuracy(model, heldout["test_pairs"], tokenizer, args),
        "r_test": gold.pearson([s[-1] for s in scores], [g[-1] for g in prefix]),
        "red": gold.credit_metrics(*pooled),
        "prefix_r": float(np.mean(tracking)),
        "prefix_r_replies": len(tracking),
        "step_r": gold.pearson(
            np.concatenate(red_rewards), np.concatenate([np.diff(g) for g in prefix])
        ),
    }
    if samples is not None:
        figures["acc_samples"] = pair_accuracy(model, samples["pairs"], tokenizer, args)
        sample_scores = position_scores(model, samples["encoded"], args.batch_size, "samples")
        figures["r_samples"] = gold.pearson([s[-1] for s in sample_scores], samples["gold"])
    return figures


def discriminator_figures(model, tokenizer, heldout, args):
    encoded, credit, prefix = heldout["encoded"], heldout["credit"], heldout["prefix"]
    logits = position_scores(model, encoded, args.batch_size, "held-out replies")
    rewards = [
        2 * (1 / (1 + np.exp(-lg[1:]))) - 1 for lg in logits
    ]  # eq. 7: r_t = 2·D(a_t) − 1, read at a_t
    pooled = gold.pool_replies(
        (r, c["credit"], c["word_of_token"]) for r, c in zip(rewards, credit)
    )
    return {
        "tlcr": gold.credit_metrics(*pooled),
        "r_test_sum": gold.pearson([r.sum() for r in rewards], [g[-1] for g in prefix]),
    }


def main(argv=None):
    args = parse_args(argv)
    torch.set_grad_enabled(False)
    models = named(args.reward_models)
    discriminators = named(args.discriminators)
    first = next(iter({**models, **discriminators}.values()))
    tokenizer = hf_models.load_tokenizer(first)
    splits = common.split_pairs(plumbing.load_data(args.data, "all", args.split_seed, quiet=True),
                                args.split_seed)
    rows, kinds = heldout_replies(splits["test"])
    encoded = encode_rows(rows, tokenizer, args)
    heldout = {
        "rows": rows,
        "encoded": encoded,
        "credit": [
            dict(zip(("credit", "word_of_token"), gold.token_credit(tokenizer, response)))
            for _, response in encoded
        ],
        "prefix": prefix_gold(tokenizer, rows, encoded),
        "rl_pairs": gold.rank_pairs(splits["rl"])[0],
        "test_pairs": gold.rank_pairs(splits["test"])[0],
    }
    samples = None
    if args.samples:
        sample_pairs = common.load_pairs(args.samples)
        if {p.prompt for p in sample_pairs} & {p.prompt for p in splits["reward"]}:
            raise SystemExit("--samples: replies to reward-split prompts (use gold_samples.py "
                             "--split rl)")
        replies = list(
            {(p.prompt, text): p for p in sample_pairs for text in (p.chosen, p.rejected)}.items())
        sample_rows = [(p, text) for (_, text), p in replies]
        samples = {
            "pairs": sample_pairs,
            "encoded": encode_rows(sample_rows, tokenizer, args),
            "gold": [gold.gold_score(text) for _, text in sample_rows],
        }
    results = {
        "heldout_replies": kinds,
        "heldout_tokens": sum(len(r) for _, r in encoded),
        "rl_pairs": len(heldout["rl_pairs"]),
        "test_pairs": len(heldout["test_pairs"]),
        "sample_pairs": len(samples["pairs"]) if samples else 0,
        "reward_models": {},
        "discriminators": {},
    }
    for name, path in models.items():
        model = red.load_reward_model(path)
        results["reward_models"][name] = reward_model_figures(
            model, tokenizer, heldout, samples, args)
    for name, path in discriminators.items():
        model = disc.load_discriminator(path)
        results["discriminators"][name] = discriminator_figures(model, tokenizer, heldout, args)
    for name, f in results["reward_models"].items():
        red_ = f["red"]
        on_samples = f" samples {f['acc_samples']:.3f} r {f['r_samples']:+.3f}" if samples else ""
        print(f"{name:>14}: acc rl {f['acc_rl']:.3f} test {f['acc_test']:.3f}{on_samples}"
              f" | r(R, gold) {f['r_test']:+.3f} | RED auc harm {red_['auc_harm']:.3f}"
              f" safe {red_['auc_safe']:.3f} word r {red_['word_r']:+.3f}"
              f" | prefix r {f['prefix_r']:+.3f} step r {f['step_r']:+.3f}")
    for name, f in results["discriminators"].items():
        tlcr = f["tlcr"]
        print(f"{name:>14}: TLCR auc harm {tlcr['auc_harm']:.3f} safe {tlcr['auc_safe']:.3f}"
              f" word r {tlcr['word_r']:+.3f} | r(Σ reward, gold) {f['r_test_sum']:+.3f}")
    if args.out:
        checkpoint.atomic_write(args.out, json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()

"""eval.py — compare policies the way the papers do, and show the token rewards.

Every policy (SFT, sequence PPO, RED, TLCR …) answers the same held-out prompts with the same seed,
sampled exactly as PPO samples (ppo_token.generate: top_p 0.9, temperature 1, KV cache); a response
runs up to and including its first EOS, or stops at --max-new-tokens. Per policy we report:

    RM score       mean R_φ(x, y), the Bradley–Terry reward at the last response token
    TLCR reward    mean over all response tokens of r_t = 2·D(a_t | x, a_<t) − 1 (TLCR eq. 7)
    KL             k1 estimator, Σ_t log π(a_t) − log π_ref(a_t) per response, averaged; and per
                   token
    PPL (ref)      exp(−mean log π_ref(a_t)) over all response tokens: fluency under the SFT model
    Length, EOS %  response tokens (EOS included), share of responses that ended at EOS
    Gold           with --gold (the offline lab): mean gold.py score of the response texts, a known
                   reward that no policy optimised directly; compare it at equal KL
and, with --gold, the true token credit: how well each source of token rewards PPO can train on
(TLCR's 2·D − 1 and its ablations tlcr_fixed / tlcr_no_negative / tlcr_no_positive, the same
discriminator clipped or thresholded; RED's R(x, y≤t) − R(x, y≤t−1); seq's R(x, y) on the last
token, 0 elsewhere) puts reward where the gold credit is (gold.token_credit: each token carries the
weight of its word). gold.credit_metrics gives AUC harm (−reward separating harm-word tokens from
the rest), AUC safe (reward separating safe-word tokens), per-word r (summed reward against the
word's weight) and, per reply, r between the summed token rewards and gold(y). Measured (a) on
held-out replies: the --num-prompts test pairs' chosen and rejected replies and the rule revision of
each gold-rejected one (gold.gold_revise, as label.py makes them), cut to --credit-response-len;
(b) on every policy's own samples, with every source (a policy named like a source trained on it).
and, with --labels, the discriminator's token accuracy on held-out labels (paper: 81.4%).

Win rate against a baseline (AlpacaEval style), % = 100 · mean pair score:
    reward-model   offline: the reward model prefers the higher R_φ; equal scores are a tie (½)
    openai         any OpenAI-compatible chat endpoint (key from $OPENAI_API_KEY, never written
                   out). Each pair is judged in both orders to cancel position bias:
                   pair score = (points with the policy as A + points with it as B) / 2, a win 1,
                   a tie ½, a loss 0, so a judge that always picks A gives 50%. Identical answers
                   are a tie without a call. One test request before anything is generated (a bad
                   key, model or URL stops the run at once); retries with backoff on
                   429/5xx/timeouts/malformed or null answers (Retry-After honoured, capped);
                   answers other than exactly A / B / tie are asked again within the same
                   --max-retries, then counted as failed (left out). Every verdict is appended to
                   OUT/judge_cache.jsonl: a rerun pays only for new pairs.
    none           no win rates

Outputs in --out: results.json, results.md (one row per policy, the layout of TLCR Table 1),
responses.jsonl (every response), report.html (one self-contained file: the table, the PPO training
curves from the log.jsonl files as in TLCR Figure 7, and a few responses with every token shaded by
its TLCR and RED reward as in TLCR Figure 8, the value on hover).

    python eval.py --policies sft=runs/demo/sft seq=runs/demo/ppo_seq/policy \\
        red=runs/demo/ppo_red/policy tlcr=runs/demo/ppo_tlcr/policy --reference runs/demo/sft \\
        --reward-model runs/demo/rm --discriminator runs/demo/disc \\
        --labels runs/demo/labels.jsonl --out runs/demo/eval          # CPU or one GPU (auto)
    OPENAI_API_KEY=... python eval.py ... --judge openai --api-model gpt-4-0125-preview
    python eval.py ... --judge openai --api-base http://localhost:8000/v1 --api-model my-model

Evaluation runs in one process (one GPU or CPU), not under torchrun. Policies are loaded one at a
time; the reference, reward model and discriminator stay loaded.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import torch
from tqdm import tqdm

import common
import discriminator
import gold
import plumbing
import ppo_token
import redistribute
import report
from plumbing import amp, chat, checkpoint, decode, distributed, gpt_judge, hf_models


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=plumbing.HelpFormatter)
    data = plumbing.add_data_args(parser.add_argument_group("data"), split="test",
                                  response_len=False, limit=False)
    data.add_argument("--num-prompts", type=int, default=64,
                      help="prompts evaluated (the first N of the split)")
    data.add_argument("--samples-per-prompt", type=int, default=1,
                      help="replies sampled per prompt and policy (each prompt K times in a row; "
                           "every policy gets the same sampling seed, so the same prompts and "
                           "random draws)")
    data.add_argument("--labels", default=None,
                      help="held-out labels.jsonl from label.py: discriminator token accuracy")
    data.add_argument("--labels-split", default="heldout", choices=["heldout", "all"],
                      help="heldout: the labelled pairs discriminator.py held out in training; "
                           "all: every pair")
    data.add_argument("--logs", nargs="*", default=None, metavar="NAME=LOG",
                      help="PPO log.jsonl files to draw (default: log.jsonl beside or above each "
                           "policy dir)")
    model = parser.add_argument_group("model")
    model.add_argument("--policies", nargs="+", required=True, metavar="NAME=PATH",
                       help="policies to compare, as name=path; the first is the baseline unless "
                            "--baseline")
    model.add_argument("--reference", required=True,
                       help="the reference (SFT) model for KL and perplexity")
    model.add_argument("--reward-model",
                       help="the Bradley–Terry reward model dir (redistribute.py); required "
                            "unless --gold-only")
    model.add_argument("--discriminator",
                       help="the TLCR discriminator dir (discriminator.py); required unless "
                            "--gold-only")
    model.add_argument("--baseline", default=None,
                       help="name of the baseline policy for win rates (default: the first)")
    gen = parser.add_argument_group("generation and judging")
    decode.add_sampling_args(gen, 128, "response length limit in tokens")
    gen.add_argument("--eval-batch-size", type=int, default=16,
                     help="prompts per generation and scoring batch")
    gen.add_argument("--gold", action="store_true",
                     help="the offline lab: the gold.py score of every response (a column, and "
                          "curves against PPO steps and against KL in the report)")
    gen.add_argument("--gold-only", action="store_true",
                     help="the lab's fast mode (study.py): gold, KL, length and EOS per policy "
                          "only; implies --gold and --judge none; no reward model or discriminator "
                          "is loaded, no token credit, no discriminator accuracy")
    gold.add_lexicon_arg(gen, "--gold")
    gen.add_argument("--credit-response-len", type=int, default=96,
                     help="--gold: held-out replies scored for token credit are cut to this many "
                          "tokens (EOS included; the reward model's and discriminator's "
                          "--max-response-len)")
    gen.add_argument("--judge", default="reward-model", choices=["reward-model", "openai", "none"],
                     help="who decides the pairwise win rates")
    gen.add_argument("--api-base", default="https://api.openai.com/v1",
                     help="openai judge: chat-completions base URL")
    gen.add_argument("--api-model", default="gpt-4-0125-preview", help="openai judge: model name")
    gen.add_argument("--api-key-env", default="OPENAI_API_KEY",
                     help="openai judge: environment variable holding the API key (unset: "
                          "localhost only)")
    gen.add_argument("--concurrency", type=int, default=4, help="openai judge: requests in flight")
    gen.add_argument("--timeout", type=float, default=60.0,
                     help="openai judge: seconds for a whole request (connect, headers and the "
                          "full answer)")
    gen.add_argument("--max-retries", type=int, default=5,
                     help="openai judge: retries on 429/5xx/timeouts/bad answers")
    gen.add_argument("--retry-after-cap", type=float, default=chat.RETRY_AFTER_CAP,
                     help="openai judge: longest wait a server's Retry-After may ask for, seconds")
    gen.add_argument("--retry-failed", action="store_true",
                     help="openai judge: on a rerun, ask again for the verdicts whose answer came "
                          "back and could not be used (paid again; at temperature 0 the answer is "
                          "the same); transient failures (network, timeout, 429, 5xx) are always "
                          "asked again")
    out = parser.add_argument_group("output")
    out.add_argument("--out", default="runs/demo/eval", help="output folder")
    out.add_argument("--show-prompts", type=int, default=4,
                     help="prompts whose responses the report shades token by token")
    checkpoint.add_report_args(out)
    plumbing.add_system_args(parser)
    args = parser.parse_args(argv)
    args.policies = parse_named(parser, args.policies, "--policies")
    args.logs = parse_named(parser, args.logs, "--logs") if args.logs is not None else None
    args.baseline = args.baseline or next(iter(args.policies))
    if args.baseline not in args.policies:
        parser.error(
            f"--baseline {args.baseline!r} is not one of --policies ({', '.join(args.policies)})")
    plumbing.check_positive(parser, args, "num_prompts", "eval_batch_size", "max_new_tokens",
                            "max_prompt_len", "credit_response_len", "samples_per_prompt")
    if args.gold_only:
        if args.judge == "openai":
            parser.error("--gold-only judges nothing: leave out --judge openai")
        args.gold, args.judge, args.labels = True, "none", None
    else:
        for option in ("reward_model", "discriminator"):
            if getattr(args, option) is None:
                parser.error(f"--{option.replace('_', '-')} is required (unless --gold-only)")
    args.gold_lexicon = gold.lexicon_from_args(parser, args, args.gold, "--gold")  # the lab's gold
    decode.check_sampling_args(parser, args)
    return args


def parse_named(parser, items, option):
    """["sft=runs/x/sft", ...] -> {"sft": "runs/x/sft", ...}, in order."""
    named = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            parser.error(f"{option}: {item!r} is not NAME=PATH")
        if name in named:
            parser.error(f"{option}: name {name!r} given twice")
        named[name] = path
    return named


# ----------------------------------------------------------------------------------------------
# 1. the held-out prompts
# ----------------------------------------------------------------------------------------------
def select_pairs(args, quiet=False):
    """The first --num-prompts pairs of a split (--split-seed): the same prompts for every
    policy."""
    return plumbing.load_data(args.data, args.split, args.split_seed, args.num_prompts, quiet=quiet)


# ----------------------------------------------------------------------------------------------
# 2. generation: ppo_token.py's sampler (left-padded prompts, KV cache, top-p), the same for every
#    policy
# ----------------------------------------------------------------------------------------------
def generate_responses(policy, prompt_ids, prompt_mask, max_new_tokens, eos_ids, pad_id, top_p=0.9,
                       temperature=1.0, decoder=None, with_logprobs=False):
    """Sample responses for left-padded prompts [B, P] exactly as PPO does (global torch RNG: seed
    it; decoder: decode.make_decoder, None the default). Returns query_response,
    attention_mask and response_mask, all [B, P + R]; a response runs up to and including its first
    EOS, and what follows (EOS-valued padding) has attention 0. With with_logprobs, also the
    policy's log-probabilities of its response tokens, taken while sampling, [B, T_resp] as
    common.response_logprobs gives them (0 past each row's end)."""
    # [B, R]
    response = ppo_token.generate(policy, prompt_ids, prompt_mask, eos_ids, pad_id, max_new_tokens,
                                  temperature, top_p, decoder, with_logprobs)
    response, sampled_logprobs = response if with_logprobs else (response, None)
    # [B, R], 1 up to and including the first EOS
    mask, _ = ppo_token.response_mask_from(response, eos_ids)
    query_response = torch.cat([prompt_ids, response], dim=1)
    masks = (torch.cat([prompt_mask.long(), mask], dim=1),
             torch.cat([torch.zeros_like(prompt_mask.long()), mask], dim=1))
    if not with_logprobs:
        return query_response, *masks
    _, valid = common.response_index(mask)  # [B, T_resp], the columns response_logprobs gives
    return query_response, *masks, sampled_logprobs[:, : valid.shape[1]] * valid


# ----------------------------------------------------------------------------------------------
# 3. per-policy metrics
# ----------------------------------------------------------------------------------------------
def kl_to_reference(logprobs, ref_logprobs, valid):
    """k1 estimator: KL(x, y) = Σ_t log π(a_t) − log π_ref(a_t). Mean over responses and per
    token."""
    valid = valid.to(logprobs.dtype)
    log_ratio = (logprobs - ref_logprobs) * valid  # [B, T_resp]
    return {"kl": log_ratio.sum(-1).mean().item(),
            "kl_per_token": (log_ratio.sum() / valid.sum().clamp(min=1)).item()}


def reference_perplexity(ref_logprobs, valid):
    """PPL = exp(−(1/N) Σ log π_ref(a_t)) over all N response tokens."""
    valid = valid.to(ref_logprobs.dtype)
    return math.exp(-(ref_logprobs * valid).sum().item() / max(valid.sum().item(), 1.0))


@torch.no_grad()
def score_batch(policy, reference, reward_model, disc_model, query_response, attention_mask,
                response_mask, temperature, with_red, with_sources=False, logprobs=None):
    """Everything eval needs about one batch of responses, as tensors. `logprobs`: the policy's,
    when the sampler kept them (generate_responses with_logprobs): no policy forward then."""
    _, valid = common.response_index(response_mask)  # [B, T_resp]
    ref_logprobs, _ = common.response_logprobs(reference, query_response, attention_mask,
                                               response_mask, temperature)
    if logprobs is None:
        logprobs = ref_logprobs if policy is reference else common.response_logprobs(
            policy, query_response, attention_mask, response_mask, temperature)[0]
    ref_logprobs_t1 = ref_logprobs if temperature == 1.0 else \
        common.response_logprobs(reference, query_response, attention_mask, response_mask, 1.0)[0]
    scores = {
        "valid": valid,
        "logprobs": logprobs,
        "ref_logprobs": ref_logprobs,
        "ref_logprobs_t1": ref_logprobs_t1,
    }
    if reward_model is None:  # --gold-only: no reward model, no discriminator
        return {k: v.detach().cpu() for k, v in scores.items()}
    scores["rm_score"] = redistribute.sequence_reward(
        reward_model, query_response, attention_mask, response_mask
    ).float()  # [B]
    scores["tlcr"] = discriminator.token_rewards(
        disc_model, query_response, attention_mask, response_mask, mode="continuous"
    ).float()  # eq. 7, [B, T_resp]
    if with_red:  # RED eq. 6 (β_c = 1): only for the responses the report shades
        scores["red"] = redistribute.redistribute(
            reward_model, query_response, attention_mask, response_mask
        ).float()
    if with_sources:  # --gold: every token reward source, for the credit metrics
        scores["sources"] = source_token_rewards(reward_model, disc_model, query_response,
                                                 attention_mask, response_mask)
    return {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in scores.items()}


def cat_columns(tensors):
    """Concatenate [B_i, T_i] tensors along the batch, zero-padding the columns to the widest."""
    width = max(t.shape[1] for t in tensors)
    return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in tensors])


def summarize(batches, eos_flags):
    """Policy metrics from the scored batches; per-token ones pooled over all response tokens."""
    valid = cat_columns([b["valid"] for b in batches]).float()  # [N, T_resp]
    judged = {}
    if "rm_score" in batches[0]:  # not with --gold-only
        tlcr = cat_columns([b["tlcr"] for b in batches])  # [N, T_resp]
        judged = {
            "rm_score": torch.cat([b["rm_score"] for b in batches]).mean().item(),
            "tlcr_reward": ((tlcr * valid).sum() / valid.sum().clamp(min=1)).item(),
        }
    return {
        **judged,
        **kl_to_reference(
            cat_columns([b["logprobs"] for b in batches]),
            cat_columns([b["ref_logprobs"] for b in batches]),
            valid,
        ),
        "ref_perplexity": reference_perplexity(
            cat_columns([b["ref_logprobs_t1"] for b in batches]), valid
        ),
        "response_length": valid.sum(-1).mean().item(),
        "eos_share": sum(eos_flags) / len(eos_flags),
    }


def discriminator_accuracy(disc_model, tokenizer, disc_dir, labels_path, split, batch_size, device,
                           precision="auto"):
    """Token accuracy on positive/negative labels, measured by discriminator.py's own function on
    the pairs its training held out (split "heldout", same seed and fraction) or on every pair
    ("all")."""
    records = discriminator.load_labels(labels_path, tokenizer)
    examples, _ = discriminator.heldout_examples_of(records, tokenizer,
                                                    hf_models.read_run_info(disc_dir), split)
    if not examples:
        raise common.InputError(f"{labels_path}: no held-out pairs; use --labels-split all")
    return discriminator.evaluate_accuracy(disc_model, examples, batch_size,
                                           distributed.DistInfo(device=device), precision,
                                           tokenizer.pad_token_id)


# ----------------------------------------------------------------------------------------------
# 4. true token credit (--gold): where each reward source puts credit, against the gold
# ----------------------------------------------------------------------------------------------
CREDIT_SOURCES = (*ppo_token.TLCR_MODES, "red", "seq")  # every task reward of ppo_token.py --reward


@torch.no_grad()
def source_token_rewards(reward_model, disc_model, query_response, attention_mask,
                         response_mask) -> dict:
    """{source: token rewards [B, T_resp]} of every --reward of ppo_token.py (at its defaults), from
    one pass of the discriminator and one of the reward model; column j: the j-th response token."""
    _, valid = common.response_index(response_mask)  # [B, T_resp]
    probs = discriminator.token_probs(disc_model, query_response, attention_mask,
                                      response_mask)  # D(a_t | x, a_<t), [B, T_resp]
    rewards = {name: discriminator.rewards_from_probs(probs, valid, mode)  # eq. 7 and the ablations
               for name, mode in ppo_token.TLCR_MODES.items()}
    scores = redistribute.score_positions(reward_model, query_response, attention_mask)  # [B, T]
    # RED eq. 6: R(x, y≤t) − R(x, y≤t−1); seq: R(x, y) on the last token (eq. 7 with β_c = 0)
    rewards["red"] = redistribute.redistribute_scores(scores, attention_mask, response_mask)
    rewards["seq"] = redistribute.redistribute_scores(scores, attention_mask, response_mask,
                                                      beta_c=0.0)
    return {name: r.float().cpu() for name, r in rewards.items()}


def reply_credit(tokenizer, ids, lexicon: gold.Lexicon | None = None) -> dict:
    """The gold credit of one reply's tokens (gold.token_credit) and the reply's gold score, under
    `lexicon` (default: the bundled harm lexicon), as every --gold function below."""
    credit, word_of_token = gold.token_credit(tokenizer, ids, lexicon=lexicon)
    text, _ = gold.token_spans(tokenizer, ids)
    return {"credit": credit, "word_of_token": word_of_token,
            "gold": gold.gold_score(text, lexicon=lexicon)}


def credit_summary(replies, source_rewards) -> dict:
    """{source: gold.credit_metrics(...) + reply_r} over the replies; source_rewards[source] holds
    one list of token rewards per reply. reply_r: Pearson r of Σ_t reward and gold(y) over replies.
    NaN (an empty class, a constant side) is written None."""
    summary = {}
    golds = [reply["gold"] for reply in replies]
    for source, per_reply in source_rewards.items():
        pooled = gold.pool_replies((rewards, reply["credit"], reply["word_of_token"])
                                   for rewards, reply in zip(per_reply, replies))
        metrics = {**gold.credit_metrics(*pooled), "replies": len(replies),
                   "reply_r": gold.pearson([sum(rewards) for rewards in per_reply], golds)}
        summary[source] = {k: None if isinstance(v, float) and math.isnan(v) else v
                           for k, v in metrics.items()}
    return summary


def heldout_replies(pairs,
                    lexicon: gold.Lexicon | None = None) -> list[tuple[str, common.Pair, str]]:
    """(kind, pair, reply) of the held-out replies: every pair's chosen and rejected reply, and the
    rule revision of the gold-rejected reply of each pair gold ranks (ties: none)."""
    ranked, _ = gold.rank_pairs(pairs, lexicon=lexicon)
    revisions = {p.id: gold.gold_revise(p.rejected, lexicon=lexicon) for p in ranked}
    rows = []
    for pair in pairs:
        rows += [("chosen", pair, pair.chosen), ("rejected", pair, pair.rejected)]
        if revisions.get(pair.id):
            rows.append(("revised", pair, revisions[pair.id]))
    return rows


def heldout_credit_replies(pairs, tokenizer, max_prompt_len, max_response_len, chat_template=True,
                           lexicon: gold.Lexicon | None = None):
    """(kind, prompt ids, response ids) of each of heldout_replies(pairs)."""
    rows = []
    for kind, pair, text in heldout_replies(pairs, lexicon):
        prompt_text = common.prompt_text(tokenizer, pair.prompt, pair.messages, chat_template)
        prompt = common.encode_prompt(tokenizer, prompt_text, max_prompt_len)
        response = common.response_text(tokenizer, text, pair.messages, chat_template)
        rows.append((kind, prompt, common.encode_response(tokenizer, response, max_response_len)))
    return rows


@torch.no_grad()
def heldout_credit(rows, tokenizer, reward_model, disc_model, batch_size, device, precision="auto",
                   lexicon: gold.Lexicon | None = None) -> dict:
    """credit_summary of every source on the held-out replies, with the count of each kind."""
    replies, source_rewards = [], {name: [] for name in CREDIT_SOURCES}
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        batch = common.collate_right([(prompt, response) for _, prompt, response in chunk],
                                     tokenizer.pad_token_id)
        query_response, attention_mask, response_mask = (t.to(device) for t in batch)  # [B, T] each
        with amp.autocast(device, precision):
            rewards = source_token_rewards(reward_model, disc_model, query_response, attention_mask,
                                           response_mask)
        for row, (_, _, response) in enumerate(chunk):
            replies.append(reply_credit(tokenizer, response, lexicon))
            for name in CREDIT_SOURCES:
                source_rewards[name].append(rewards[name][row, : len(response)].tolist())
    kinds = {kind: sum(k == kind for k, _, _ in rows) for kind in ("chosen", "rejected", "revised")}
    return {"replies": kinds, "by_source": credit_summary(replies, source_rewards)}


# ----------------------------------------------------------------------------------------------
# 5. judges: pair scores and win rates
# ----------------------------------------------------------------------------------------------
POINTS_AS_A = {"A": 1.0, "tie": 0.5, "B": 0.0}  # the policy's points when it is answer A


def pair_score(verdict_policy_first, verdict_baseline_first):
    """The policy's score on one prompt from both orders: win both 1, split ½, tie counts half."""
    if verdict_policy_first is None or verdict_baseline_first is None:
        return None  # a failed judgement: left out of the win rate, counted as failed
    as_a = POINTS_AS_A[verdict_policy_first]
    as_b = 1.0 - POINTS_AS_A[verdict_baseline_first]  # the policy is answer B here
    return (as_a + as_b) / 2


def aggregate_win_rate(scores):
    """Win rate (%) = mean pair score over judged pairs; wins/ties/losses by pair score."""
    judged = [s for s in scores if s is not None]
    return {
        "win_rate": 100.0 * sum(judged) / len(judged) if judged else None,
        "wins": sum(s > 0.5 for s in judged),
        "ties": sum(s == 0.5 for s in judged),
        "losses": sum(s < 0.5 for s in judged),
        "judged": len(judged),
        "failed": len(scores) - len(judged),
    }


def reward_model_win_rate(scores, baseline_scores):
    """Offline judge: the reward model prefers the higher score; equal scores are a tie."""
    pair = [0.5 if math.isclose(s, b, rel_tol=1e-6, abs_tol=1e-6) else float(s > b)
            for s, b in zip(scores, baseline_scores)]
    return aggregate_win_rate(pair)


def openai_win_rate(judge, prompts, responses, baseline_responses, desc="judge"):
    """Each pair judged in both orders (gpt_judge.verdicts_both_orders); identical answers are a
    tie without a call."""
    verdicts = gpt_judge.verdicts_both_orders(judge, prompts, responses, baseline_responses, desc)
    return aggregate_win_rate([0.5 if pair is None else pair_score(*pair) for pair in verdicts])


def main(argv=None):
    args = parse_args(argv)
    dist_info = distributed.setup_distributed(args.device)
    if dist_info.enabled:
        raise common.InputError("eval.py runs in one process: start it with python, not torchrun")
    device, out = dist_info.device, Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    judge = None
    # one test request now: a bad key, model or URL fails before any generation
    if args.judge == "openai":
        try:
            judge = gpt_judge.OpenAIJudge(
                args.api_base, args.api_model, out / "judge_cache.jsonl",
                api_key=chat.api_key_from_env(args.api_key_env, args.api_base),
                timeout=args.timeout, max_retries=args.max_retries,
                retry_after_cap=args.retry_after_cap, concurrency=args.concurrency,
                key_env=args.api_key_env, retry_failed=args.retry_failed)
            judge.client.check()
        except chat.ChatFatal as e:
            raise common.InputError(f"--judge openai: {e}") from None  # one line, exit code 2

    # 1. prompts and the frozen models (every tokenizer checked against the reference's first)
    pairs = select_pairs(args)
    tokenizer = hf_models.load_tokenizer(args.reference, trust_remote_code=args.trust_remote_code,
                                         what="--reference")
    for option, path in [
        *((o, p) for o, p in [("--reward-model", args.reward_model),
                              ("--discriminator", args.discriminator)] if not args.gold_only),
        *((f"--policies {name}", p) for name, p in args.policies.items()),
    ]:
        hf_models.check_same_tokenizer(
            tokenizer, hf_models.load_tokenizer(path, args.trust_remote_code, what=option),
            f"{option} {path}")
    # K replies per prompt: each prompt K times in a row (reply i answers prompt i // K)
    asked = [pair for pair in pairs for _ in range(args.samples_per_prompt)]
    prompts = [pair.prompt for pair in asked]
    encoded = common.encode_prompts(tokenizer, asked, args.max_prompt_len, args.chat_template)
    eos_ids = None

    # in --frozen-dtype, computing like the trained models (distributed.prepare_frozen)
    def frozen(model):
        model = amp.cast_frozen(model, amp.frozen_dtype(args, device))
        return distributed.prepare_frozen(model, distributed.DistInfo(device=device),
                                          precision=args.precision)

    reference = frozen(
        hf_models.load_policy(
            args.reference, trust_remote_code=args.trust_remote_code, what="--reference"
        )
    )
    eos_ids = common.eos_token_ids(tokenizer, reference)
    reward_model = disc_model = None  # --gold-only: neither is read
    if not args.gold_only:
        reward_model = frozen(
            hf_models.load_score_model(
                args.reward_model, trust_remote_code=args.trust_remote_code, what="--reward-model"
            )
        )
        disc_model = frozen(
            hf_models.load_score_model(
                args.discriminator, trust_remote_code=args.trust_remote_code, what="--discriminator"
            )
        )

    # 2. the true token credit of every reward source on held-out replies (--gold)
    credit = None
    if args.gold and not args.gold_only:
        rows = heldout_credit_replies(pairs, tokenizer, args.max_prompt_len,
                                      args.credit_response_len, args.chat_template,
                                      args.gold_lexicon)
        held = heldout_credit(rows, tokenizer, reward_model, disc_model, args.eval_batch_size,
                              device, args.precision, args.gold_lexicon)
        credit = {"heldout": held, "samples": {}}
        print("token credit on held-out replies: " + ", ".join(
            f"{source} AUC harm {report.fmt(m['auc_harm'], '{:.3f}')} "
            f"safe {report.fmt(m['auc_safe'], '{:.3f}')} r {report.fmt(m['word_r'], '{:+.3f}')}"
            for source, m in held["by_source"].items() if source in ("tlcr", "red", "seq")))

    # 3. generate and score, one policy at a time, the same seed for each
    generated, metrics, shaded = {}, {}, {}
    # how generate runs each policy: a static KV cache, with --compile a compiled decode step
    decoder = decode.make_decoder(args.compile, device.type)
    # the policy's log-probabilities for the KL: in fp32 those the sampler computed (a decode step's
    # equal a full forward's within 2e-5, tests/test_eval.py), which saves a forward a batch; in
    # bf16 the scoring forward, whose rounding then matches the reference's
    keep_logprobs = not amp.use_bf16(args.precision, device)
    for name, path in args.policies.items():
        policy = (
            reference
            if Path(path).resolve() == Path(args.reference).resolve()
            else frozen(
                hf_models.load_policy(
                    path, trust_remote_code=args.trust_remote_code, what=f"--policies {name}"
                )
            )
        )
        torch.manual_seed(args.seed)  # the same sampling noise for every policy
        batches, texts, eos_flags, shaded[name] = [], [], [], []
        replies, source_rewards = [], {source: [] for source in CREDIT_SOURCES}  # --gold: credit
        for start in tqdm(range(0, len(prompts), args.eval_batch_size), desc=f"eval {name}"):
            prompt_ids, prompt_mask = common.pad_left(encoded[start : start + args.eval_batch_size],
                                                      tokenizer.pad_token_id)
            prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
            with amp.autocast(device, args.precision):
                query_response, attention_mask, response_mask, *sampled = generate_responses(
                    policy, prompt_ids, prompt_mask, args.max_new_tokens, eos_ids,
                    tokenizer.pad_token_id, args.top_p, args.temperature, decoder,
                    with_logprobs=keep_logprobs and policy is not reference)
                scores = score_batch(policy, reference, reward_model, disc_model, query_response,
                                     attention_mask, response_mask, args.temperature,
                                     start < args.show_prompts and not args.gold_only,
                                     with_sources=args.gold and not args.gold_only,
                                     logprobs=sampled[0] if sampled else None)
            batches.append(scores)
            # [B, T_resp]
            response_ids = common.gather_response(query_response, response_mask).cpu()
            for row in range(response_ids.shape[0]):
                ids = response_ids[row, : int(scores["valid"][row].sum())].tolist()
                ended = bool(ids) and ids[-1] in eos_ids
                eos_flags.append(ended)
                texts.append(tokenizer.decode(ids[:-1] if ended else ids))
                if args.gold and not args.gold_only:
                    replies.append(reply_credit(tokenizer, ids, args.gold_lexicon))
                    for source in CREDIT_SOURCES:
                        token_rewards = scores["sources"][source][row, : len(ids)]  # [T_i]
                        source_rewards[source].append(token_rewards.tolist())
                if start + row < args.show_prompts and not args.gold_only:
                    shaded[name].append({"tokens": [tokenizer.decode([t]) for t in ids],
                                         "tlcr": scores["tlcr"][row, : len(ids)].tolist(),
                                         "red": scores["red"][row, : len(ids)].tolist(),
                                         **({"gold": replies[-1]["credit"]} if args.gold else {})})
        generated[name] = {
            "texts": texts,
            "rm_scores": torch.cat([b["rm_score"] for b in batches]).tolist()
            if "rm_score" in batches[0] else [None] * len(texts),
            "eos": eos_flags,
        }
        metrics[name] = summarize(batches, eos_flags)
        if args.gold:  # the lab's known reward, scored on the text of each response
            generated[name]["gold"] = [gold.gold_score(text, lexicon=args.gold_lexicon)
                                       for text in texts]
            golds = generated[name]["gold"]
            metrics[name]["gold_score"] = sum(golds) / len(golds)
            # its sampling error: sd / √n over the replies (the eval's share of a study's noise)
            metrics[name]["gold_score_se"] = (statistics.stdev(golds) / math.sqrt(len(golds))
                                              if len(golds) > 1 else None)
            if credit is not None:
                credit["samples"][name] = credit_summary(replies, source_rewards)
        if policy is not reference:
            del policy
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(f"{name}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics[name].items()
                                      if v is not None))
    # every response on disk before any judge is paid (a judge failure loses no generation)
    checkpoint.atomic_write(
        out / "responses.jsonl",
        "".join(
            json.dumps(
                {
                    "prompt_index": i,
                    "policy": name,
                    "prompt": prompts[i],
                    "response": g["texts"][i],
                    "rm_score": g["rm_scores"][i],
                    "ended_at_eos": g["eos"][i],
                    **({"gold_score": g["gold"][i]} if "gold" in g else {}),
                }
            )
            + "\n"
            for name, g in generated.items()
            for i in range(len(prompts))
        ),
    )

    # 4. win rates against the baseline
    base = generated[args.baseline]
    for name in args.policies:
        if name == args.baseline or args.judge == "none":
            continue
        if args.judge == "reward-model":
            metrics[name].update(
                reward_model_win_rate(generated[name]["rm_scores"], base["rm_scores"]))
        else:
            try:
                metrics[name].update(
                    openai_win_rate(
                        judge,
                        prompts,
                        generated[name]["texts"],
                        base["texts"],
                        desc=f"judge {name}",
                    )
                )
            except gpt_judge.JudgeError as e:  # scrubbed; the verdicts so far are in the cache
                raise common.InputError(f"--judge openai: {e}; the responses are in "
                                        f"{out / 'responses.jsonl'}") from None

    if judge is not None and judge.failures:
        print(chat.rerun_note(chat.failure_counts(judge.failures), what="verdicts"))

    # 5. discriminator accuracy, results, report
    accuracy = None
    if args.labels:
        accuracy = discriminator_accuracy(disc_model, tokenizer, args.discriminator, args.labels,
                                          args.labels_split, args.eval_batch_size, device,
                                          args.precision)
        accuracy.update(split=args.labels_split, labels=str(args.labels))
    results = {
        "baseline": args.baseline,
        "judge": args.judge if args.judge != "openai" else f"openai:{args.api_model}",
        "paths": {
            "policies": args.policies,
            "reference": args.reference,
            "reward_model": args.reward_model,
            "discriminator": args.discriminator,
        },
        "split": args.split,
        "num_prompts": len(pairs),
        "samples_per_prompt": args.samples_per_prompt,
        "seed": args.seed,
        "max_new_tokens": args.max_new_tokens,
        "top_p": args.top_p,
        "temperature": args.temperature,
        "lexicon": args.gold_lexicon.id if args.gold_lexicon else None,  # --gold: the gold's id
        "policies": metrics,
        "discriminator_accuracy": accuracy,
        "credit": credit,
        "judge_calls": judge.calls if judge is not None else 0,
        "judge_failed": None if judge is None else chat.failure_counts(judge.failures),
    }
    samples = [
        {"prompt": prompts[k], "responses": {name: shaded[name][k] for name in args.policies}}
        for k in range(0 if args.gold_only else min(args.show_prompts, len(prompts)))
    ]
    logs = args.logs if args.logs is not None else report.find_logs(args.policies)
    checkpoint.atomic_write(out / "results.json", json.dumps(results, indent=2))
    # --report-to: each policy's metrics (results.json)
    tracker = checkpoint.open_tracker(args, out)
    if tracker is not None:
        tracker.log({f"{name}/{k}": v for name, m in metrics.items() for k, v in m.items()})
        tracker.close()
    checkpoint.atomic_write(out / "results.md", report.results_markdown(results))
    checkpoint.atomic_write(out / "report.html",
                            report.report_html(results, samples, report.training_curves(logs)))
    print(report.results_markdown(results))
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'report.html'}")
    return results


if __name__ == "__main__":
    plumbing.cli(main)

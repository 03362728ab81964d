"""Tests of ppo_token.py: the maths on hand-made tensors, positions under left padding, and learning
on tiny GPT-2s."""
import itertools
import json
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import common
import plumbing
import ppo_token as ppo
from conftest import run_torchrun
from plumbing import checkpoint, distributed, hf_models, ppo_setup

REPO = Path(__file__).resolve().parents[1]
# toy vocabulary: a random policy gives EOS about 1/8 of the time, so lengths can move both ways
V = 8


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one thread, then restored


def tiny_lm(seed=0, eos=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=V, n_layer=1, n_embd=32, n_head=2, n_positions=64, eos_token_id=eos,
                     bos_token_id=eos, pad_token_id=eos)
    return common.disable_dropout(GPT2LMHeadModel(cfg))


def make_args(*extra):
    return ppo.parse_args(
        [
            "--policy", "unused", "--out", "unused", "--reward", "seq", "--reward-model", "unused",
            "--max-new-tokens", "16", "--top-p", "1.0", *extra,
        ]
    )


def toy_models(lr=3e-3, eos=0):
    policy, ref_policy = tiny_lm(0, eos), tiny_lm(0, eos).requires_grad_(False)
    critic = common.ScoreModel(tiny_lm(1, eos).transformer)
    return policy, ref_policy, critic, plumbing.adamw(policy, lr), plumbing.adamw(critic, lr)


def as_models(policy, ref_policy, critic, reward_fn, args, optimizers=(None, None)):
    """The record load_models builds, around hand-made models: the reference read as a frozen
    copy."""
    return ppo.Models(policy, critic, *optimizers,
                      ppo_setup.reference_logprobs_fn(policy, ref_policy, args.temperature),
                      reward_fn)


# different lengths: left padding on every row but one
PROMPTS = [[1, 2, 3], [4, 5], [6], [2, 2, 2, 2]]


# ----------------------------------------------------------------------------------------------
# The maths on hand-made tensors
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.7)])
def test_gae_matches_python_loop(gamma, lam):
    torch.manual_seed(0)
    B, R = 5, 7
    rewards, values = torch.randn(B, R), torch.randn(B, R)
    lengths = [7, 1, 4, 6, 3]
    mask = (torch.arange(R)[None] < torch.tensor(lengths)[:, None]).long()
    advantages, returns = ppo.gae(rewards * mask, values, mask, gamma, lam)
    for b, n in enumerate(lengths):
        # value after the last action: 0
        r, v = rewards[b, :n].tolist(), values[b, :n].tolist() + [0.0]
        running = 0.0
        for j in reversed(range(n)):
            running = r[j] + gamma * v[j + 1] - v[j] + gamma * lam * running
            assert advantages[b, j].item() == pytest.approx(running, abs=1e-5)
            assert returns[b, j].item() == pytest.approx(running + v[j], abs=1e-5)
        assert advantages[b, n:].abs().sum() == 0 and returns[b, n:].abs().sum() == 0


def test_masked_whiten():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    out = ppo.masked_whiten(x, torch.tensor([[0, 1, 1, 0]]))
    assert torch.allclose(out, torch.tensor([[0.0, -0.5 ** 0.5, 0.5 ** 0.5, 0.0]]), atol=1e-4)
    for mask in ([[0, 0, 1, 0]], [[0, 0, 0, 0]]):  # one or no valid value: zeros, not NaN or inf
        assert torch.equal(ppo.masked_whiten(x, torch.tensor(mask)), torch.zeros_like(x))


def test_response_mask_stops_at_first_eos_with_pad_equal_eos():
    eos = 0
    response = torch.tensor([[5, 0, 0, 0],  # EOS then pads that are also EOS: only the first counts
                             [5, 6, 7, 3],   # no EOS: truncated, every token counts
                             [0, 0, 0, 0]])  # EOS at once: a one-token response
    mask, ended = ppo.response_mask_from(response, [eos])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert ended.tolist() == [True, False, True]
    # several EOS ids (Llama 3 instruct: <|eot_id|> and <|end_of_text|>): the first of any ends a
    # response
    mask, ended = ppo.response_mask_from(torch.tensor([[5, 7, 0, 3], [5, 6, 7, 3]]), [0, 7])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 0]] and ended.tolist() == [True, True]


def test_build_token_rewards_positions():
    task = torch.tensor([[0.5, 9.0, 1.0, 7.0], [1.0, 2.0, 3.0, 4.0]])  # 7.0 sits past row 0's end
    logprobs = torch.tensor([[-1.0, -2.0, -3.0, -4.0], [-1.0, -1.0, -1.0, -1.0]])
    ref_logprobs = torch.tensor([[-1.5, -2.0, -2.0, -9.0], [-2.0, -1.0, -1.0, -3.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    ended = torch.tensor([True, False])  # row 1 hit the length limit
    rewards, task_out, kl = ppo.build_token_rewards(task, logprobs, ref_logprobs, mask, ended,
                                                    kl_coef=0.1, reward_clip=5.0,
                                                    missing_eos_penalty=2.0)
    # KL_j = log π − log π_ref, per action; zero past the end
    assert torch.allclose(kl, torch.tensor([[0.5, 0.0, -1.0, 0.0], [1.0, 0.0, 0.0, 2.0]]))
    # task reward clipped to ±5; the missing-EOS penalty lands on the truncated row's last action
    # only
    assert torch.allclose(task_out, torch.tensor([[0.5, 5.0, 1.0, 0.0], [1.0, 2.0, 3.0, 2.0]]))
    # r_j = task_j − β·KL_j
    assert torch.allclose(rewards, torch.tensor([[0.45, 5.0, 1.1, 0.0], [0.9, 2.0, 3.0, 1.8]]))


def test_policy_and_value_loss_clip():
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1
    loss, clipped = ppo.policy_loss(new, old, torch.tensor([[1.0, 1.0, -1.0]]), clip_ratio=0.2)
    # A > 0: ratio capped at 1.2; the pessimistic side
    assert torch.allclose(loss, torch.tensor([[-1.2, -0.5, 1.1]]))
    assert clipped.tolist() == [[True, False, False]]
    vloss, vclipped = ppo.value_loss(torch.tensor([[1.0, 0.1]]), torch.zeros(1, 2),
                                     torch.tensor([[1.0, 1.0]]), 0.2)
    assert torch.allclose(vloss, torch.tensor([[0.5 * 0.8 ** 2, 0.5 * 0.9 ** 2]]))
    assert vclipped.tolist() == [[True, False]]


def test_sample_top_p_keeps_the_nucleus():
    torch.manual_seed(0)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    counts = torch.bincount(ppo.sample_top_p(logits, 0.9), minlength=4).float() / 4000
    assert counts[3] == 0  # outside the 0.9 nucleus
    assert torch.allclose(counts[:3], torch.tensor([0.5, 0.3, 0.15]) / 0.95, atol=0.03)
    assert (ppo.sample_top_p(logits[:50], 0.5) == 0).all()


# ----------------------------------------------------------------------------------------------
# Sampling and positions under left padding
# ----------------------------------------------------------------------------------------------
def test_generate_with_cache_matches_full_recompute():
    policy = tiny_lm(eos=0).eval()
    prompt, prompt_mask = common.pad_left(PROMPTS, 0)
    torch.manual_seed(1)
    response = ppo.generate(policy, prompt, prompt_mask, [0], 0, max_new_tokens=10, temperature=0.7,
                            top_p=0.9)
    torch.manual_seed(1)  # the same draws, each token recomputed from scratch without a cache
    ids, mask, done = prompt, prompt_mask, torch.zeros(len(PROMPTS), dtype=torch.bool)
    for _ in range(response.shape[1]):
        position_ids = common.position_ids_from_mask(mask)
        logits = policy(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits[:, -1]
        token = torch.where(done, 0, ppo.sample_top_p(logits / 0.7, 0.9))
        done |= token == 0
        ids, mask = (
            torch.cat([ids, token[:, None]], 1),
            torch.cat([mask, torch.ones_like(mask[:, :1])], 1),
        )
    assert torch.equal(response, ids[:, prompt.shape[1]:])
    # a left-padded row gives what the same prompt gives alone (near-greedy sampling)
    torch.manual_seed(2)
    batched = ppo.generate(policy, prompt, prompt_mask, [0], 0, 10, temperature=1e-4, top_p=1.0)
    for b, p in enumerate(PROMPTS):
        alone = ppo.generate(
            policy,
            torch.tensor([p]),
            torch.ones(1, len(p), dtype=torch.long),
            [0],
            0,
            10,
            1e-4,
            1.0,
        )[0]
        n = int(ppo.response_mask_from(alone[None], [0])[0].sum())
        assert batched[b, :n].tolist() == alone[:n].tolist()


def test_rollout_positions_are_pinned_down():
    """logprob and value of action j come from the prefix before a_j; the task reward of a_j goes to
    action j."""
    eos = 5
    policy, ref_policy, critic, _, _ = toy_models(eos=eos)
    args = make_args("--temperature", "0.7", "--reward-clip", "0", "--kl-coef", "0.5",
                     "--no-whiten-advantages")
    prompt, prompt_mask = common.pad_left(PROMPTS, eos)

    # task reward of a_j = a_j's id
    def reward_is_token_id(query_response, attention_mask, response_mask):
        return common.gather_response(query_response.float(), response_mask)

    torch.manual_seed(3)
    batch = ppo.rollout(as_models(policy, ref_policy, critic, reward_is_token_id, args), prompt,
                        prompt_mask, [eos], eos, args)
    mask = batch.response_mask
    assert torch.equal(batch.task_rewards, batch.response.float() * mask)
    assert batch.ended.any() and (mask.sum(-1) > 1).any()
    for b, p in enumerate(PROMPTS):
        for j in range(int(mask[b].sum())):
            # x, a_<j without any padding
            prefix = torch.tensor([p + batch.response[b, :j].tolist()])
            with torch.no_grad():
                logits = policy(input_ids=prefix).logits[0, -1] / 0.7
                value = critic(prefix, torch.ones_like(prefix))[0, -1]
            expected = torch.log_softmax(logits, -1)[batch.response[b, j]]
            assert batch.logprobs[b, j].item() == pytest.approx(expected.item(), abs=1e-5)
            assert batch.values[b, j].item() == pytest.approx(value.item(), abs=1e-5)
    # the reference starts equal to the policy: KL 0, so r_j = task_j exactly
    assert torch.allclose(batch.token_rewards, batch.task_rewards, atol=1e-5)


def test_first_ppo_ratio_is_one_under_left_padding():
    policy, ref_policy, critic, _, _ = toy_models()
    hf_models.enable_gradient_checkpointing(policy)
    hf_models.enable_gradient_checkpointing(critic)
    args = make_args()
    prompt, prompt_mask = common.pad_left(PROMPTS * 2, 0)
    torch.manual_seed(4)
    def no_reward(query_response, attention_mask, response_mask):
        return torch.zeros(len(query_response), int(response_mask.sum(-1).max()))

    batch = ppo.rollout(as_models(policy, ref_policy, critic, no_reward, args), prompt, prompt_mask,
                        [0], 0, args)
    # the training forward: train mode, gradient checkpointing, a shuffled minibatch
    policy.train(), critic.train()
    idx = torch.tensor([6, 1, 3])
    inputs = [batch.query_response[idx], batch.attention_mask[idx], batch.full_response_mask[idx]]
    new_logprobs, _ = common.response_logprobs(policy, *inputs)  # [3, longest of these 3 responses]
    new_values = ppo.critic_values(critic, *inputs)
    width = new_logprobs.shape[1]
    mask = batch.response_mask[idx, :width].bool()
    assert mask.sum() == batch.response_mask[idx].sum()  # nothing is lost by the narrower batch
    ratio = torch.exp(new_logprobs - batch.logprobs[idx, :width])[mask]
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-5)
    assert torch.allclose(new_values[mask], batch.values[idx, :width][mask], atol=1e-5)
    assert new_logprobs.requires_grad


# ----------------------------------------------------------------------------------------------
# It learns
# ----------------------------------------------------------------------------------------------
def run_toy(reward, steps, seed=0, *extra):
    """Train a toy policy on `reward(response, valid) -> [B, T_resp]`; return the first and last
    step's stats."""
    policy, ref_policy, critic, policy_opt, critic_opt = toy_models()
    args = make_args("--rollout-batch-size", "32", "--minibatch-size", "16", "--kl-coef", "0.01",
                     *extra)
    prompt, prompt_mask = common.pad_left(PROMPTS * 8, 0)

    def reward_fn(query_response, attention_mask, response_mask):
        valid = common.gather_response(torch.ones_like(query_response), response_mask).float()
        return reward(common.gather_response(query_response, response_mask), valid)

    models = as_models(policy, ref_policy, critic, reward_fn, args, (policy_opt, critic_opt))
    history = []
    for step in range(steps):  # main's loop: rollout (steps 1-4), then PPO epochs (step 5)
        torch.manual_seed(seed * 1000 + step)
        batch = ppo.rollout(models, prompt, prompt_mask, [0], 0, args)
        history.append(ppo.rollout_stats(batch))
        history[-1].update(ppo.ppo_update(models, batch, args, args.minibatch_size))
    return history


def test_learns_to_emit_the_rewarded_token():
    target = 3
    history = run_toy(lambda response, valid: (response == target).float() * valid, steps=12)
    # task reward per response = number of target tokens; its share of the tokens rises from ~1/8
    share = [h["task_reward"] / h["response_length"] for h in history]
    assert share[0] < 0.25 and min(share[-3:]) > 0.6, share
    explained = [h["explained_variance"] for h in history]  # the critic learns the returns too
    assert explained[0] < 0 and min(explained[-2:]) > 0.25, explained


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_response_length_follows_the_sign_of_token_rewards(sign):
    """TLCR Figure 7: without negative rewards responses grow; without positive ones they shrink."""
    history = run_toy(lambda response, valid: sign * valid, steps=8, seed=1)
    start, end = history[0]["response_length"], sum(h["response_length"] for h in history[-2:]) / 2
    assert 4 < start < 12
    assert (end > start + 3) if sign > 0 else (end < start - 3), [
        h["response_length"] for h in history
    ]


# ----------------------------------------------------------------------------------------------
# The script: CLI, resume, torchrun
# ----------------------------------------------------------------------------------------------
def toy_reward(query_response, attention_mask, response_mask):
    """+1 per response token whose id is even (enough to move a real tokenizer's model)."""
    response = common.gather_response(query_response, response_mask)
    valid = common.gather_response(torch.ones_like(query_response), response_mask)
    return ((response % 2 == 0) & (valid > 0)).float()


def cli(tiny_dir, out, steps, *extra):
    return [
        "--policy", str(tiny_dir), "--reward", "tlcr", "--discriminator", "unused",
        "--critic-init", "policy", "--out", str(out), "--iterations", str(steps),
        "--rollout-batch-size", "4", "--minibatch-size", "2", "--ppo-epochs", "2",
        "--max-prompt-len", "24", "--max-new-tokens", "6", "--policy-lr", "1e-3",
        "--critic-lr", "1e-3", *extra,
    ]


def test_cli_errors():
    with pytest.raises(SystemExit):
        # red needs --reward-model
        ppo.parse_args(["--policy", "p", "--out", "o", "--reward", "red"])
    with pytest.raises(SystemExit):
        # tlcr needs --discriminator
        ppo.parse_args(["--policy", "p", "--out", "o", "--reward", "tlcr"])
    with pytest.raises(SystemExit):
        ppo.parse_args(["--policy", "p", "--out", "o", "--reward", "seq", "--reward-model", "r",
                        "--rollout-batch-size", "6", "--minibatch-size", "4"])


def test_prompt_batches_per_rank_and_step():
    prompts = [[i] for i in range(10)]
    def ids(step, rank):
        batch = ppo_setup.prompt_batch(prompts, step, 4, seed=0, rank=rank, pad_id=0, device="cpu")
        return batch[0][:, 0].tolist()
    # deterministic; ranks draw different prompts
    assert ids(0, 0) == ids(0, 0) and ids(0, 0) != ids(0, 1)
    # one epoch sees every prompt once
    assert sorted(ids(0, 0) + ids(1, 0) + ids(2, 0)[:2]) == list(range(10))


def test_resume_reproduces_the_next_step(tiny_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    ppo.main(cli(tiny_dir, a, 2), reward_fn=toy_reward)  # k = 2 steps, checkpoint at the end
    ppo.main(cli(tiny_dir, a, 3), reward_fn=toy_reward)  # resumes and runs step 3
    ppo.main(cli(tiny_dir, b, 3), reward_fn=toy_reward)  # uninterrupted
    log_a = [json.loads(line) for line in (a / "log.jsonl").read_text().splitlines()]
    log_b = [json.loads(line) for line in (b / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log_a] == [1, 2, 3] == [r["step"] for r in log_b]
    assert {
        "task_reward",
        "token_reward",
        "kl",
        "entropy",
        "perplexity",
        "response_length",
        "eos_fraction",
        "policy_clipfrac",
        "value_clipfrac",
        "policy_loss",
        "value_loss",
        "explained_variance",
        "elapsed_s",
        "tokens_per_s",
    } <= set(log_a[-1])
    for key in log_b[-1]:
        if key not in ("elapsed_s", "tokens_per_s"):
            assert log_a[-1][key] == pytest.approx(log_b[-1][key], rel=1e-5, abs=1e-6), key
    assert log_a[-1]["kl"] != 0  # the policy did move away from the reference
    weights_a = hf_models.load_policy(a / "policy").state_dict()
    weights_b = hf_models.load_policy(b / "policy").state_dict()
    assert all(torch.allclose(weights_a[k], weights_b[k], atol=1e-6) for k in weights_b)
    state = torch.load(checkpoint.latest_checkpoint(a) / "state.pt", weights_only=True)
    assert state["step"] == 3 and set(state["optimizers"]) == {"policy", "critic"}
    assert state["optimizers"]["policy"]["state"]  # Adam moments were saved, not an empty optimizer
    # a resume with another reward (or model, or data) is refused, not silently continued
    with pytest.raises(common.InputError, match=r"--reward was 'tlcr', now 'seq'"):
        ppo.main(
            [x if x != "tlcr" else "seq" for x in cli(tiny_dir, a, 4)] + ["--reward-model", "x"],
            reward_fn=toy_reward)


def test_torchrun_two_ranks(tiny_dir, tmp_path):
    script = tmp_path / "run_ppo.py"
    script.write_text(
        f"import sys\nsys.path[:0] = [{str(REPO)!r}, {str(Path(__file__).parent)!r}]\n"
        "import ppo_token, test_ppo_token\n"
        "ppo_token.main(sys.argv[1:], reward_fn=test_ppo_token.toy_reward)\n"
    )
    out = tmp_path / "ddp"
    returncode, output = run_torchrun([script, *cli(tiny_dir, out, 2, "--device", "cpu")])
    assert returncode == 0, output[-3000:]
    assert "world size 2" in output
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(r["response_length"] > 0 for r in log)
    assert (out / "policy" / "config.json").exists() and checkpoint.latest_checkpoint(
        out
    ).name == "step-000000002"


def test_every_reward_source_runs_a_step(tiny_dir, tmp_path):
    """seq / red / tlcr from redistribute.py and discriminator.py on untrained ScoreModels; the
    critic starts from the reward model or the discriminator (--critic-init reward); seq puts R_φ on
    the last action."""
    tokenizer = hf_models.load_tokenizer(tiny_dir)
    for name, seed, kind in (("rm", 1, "sequence"), ("disc", 2, "token")):
        torch.manual_seed(seed)
        hf_models.save_score_model(hf_models.new_score_model(tiny_dir, bias=kind == "token"),
                                   tokenizer, tmp_path / name, kind)
    for reward in ("seq", "red", "tlcr"):
        argv = [
            a if a != "unused" else str(tmp_path / "disc")
            for a in cli(tiny_dir, tmp_path / reward, 1)
        ]
        argv = [a for a in argv if a not in ("--critic-init", "policy")]
        argv[argv.index("tlcr")] = reward
        system = (
            ["--gradient-checkpointing", "--offload-frozen", "--micro-batch-size", "1"]
            if reward == "red"
            else []
        )
        ppo.main(argv + ["--reward-model", str(tmp_path / "rm"), "--reward-clip", "0", *system])
        record = json.loads((tmp_path / reward / "log.jsonl").read_text())
        assert (
            all(torch.isfinite(torch.tensor(v)) for v in record.values()) and "rm_score" in record
        )
        if reward == "seq":  # the whole task reward of a response is the reward model's score
            assert record["task_reward"] == pytest.approx(record["rm_score"], abs=1e-5)
    args = ppo.parse_args(
        [
            "--policy", str(tiny_dir), "--out", str(tmp_path / "x"), "--reward", "seq",
            "--reward-model", str(tmp_path / "rm"),
        ]
    )
    reward_fn, score_fn = ppo.make_reward_fn(args, distributed.DistInfo())
    prompt, prompt_mask = common.pad_left([[5, 6, 7], [8, 9]], tokenizer.eos_token_id)
    response = torch.tensor(
        [[11, 12, tokenizer.eos_token_id, tokenizer.eos_token_id], [13, 14, 15, 16]])
    mask, _ = ppo.response_mask_from(response, [tokenizer.eos_token_id])
    query_response = torch.cat([prompt, response], 1)
    attention_mask = torch.cat([prompt_mask, mask], 1)
    response_mask = torch.cat([torch.zeros_like(prompt_mask), mask], 1)
    rewards = reward_fn(query_response, attention_mask, response_mask)
    score = score_fn(query_response, attention_mask, response_mask)
    assert rewards.shape == (2, 4) and rewards[0, 3] == 0
    assert rewards[0, :2].abs().sum() == 0 and rewards[1, :3].abs().sum() == 0
    # R_φ(x, y) on the EOS action / a truncated row's last token
    assert torch.allclose(rewards[[0, 1], [2, 3]], score)


def test_micro_batches_accumulate_to_the_same_update():
    args = make_args("--rollout-batch-size", "8", "--minibatch-size", "4", "--ppo-epochs", "1")
    prompt, prompt_mask = common.pad_left(PROMPTS * 2, 0)
    weights = []
    for micro in ("0", "1"):
        # plain SGD: Adam's first step would amplify rounding noise
        policy, ref_policy, critic, _, _ = toy_models()
        policy_opt, critic_opt = (
            torch.optim.SGD(policy.parameters(), 0.1),
            torch.optim.SGD(critic.parameters(), 0.1),
        )
        args.micro_batch_size = int(micro)
        torch.manual_seed(5)
        models = as_models(policy, ref_policy, critic,
                           lambda qr, am, rm: common.gather_response(qr.float(), rm) / V, args,
                           (policy_opt, critic_opt))
        batch = ppo.rollout(models, prompt, prompt_mask, [0], 0, args)
        ppo.ppo_update(models, batch, args, args.minibatch_size)
        weights.append(
            [p.detach().clone() for p in list(policy.parameters()) + list(critic.parameters())])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*weights))
    # the update did change the policy
    assert not torch.allclose(weights[0][0], toy_models()[0].transformer.wte.weight)


def test_models_that_do_not_belong_together_stop_the_run_at_once(tiny_dir, llama_dir, tmp_path):
    """A reward model on another tokenizer (Llama's here, a different vocabulary) or a folder
    without a trained head: refused before any model is loaded, with the option and the folder
    named."""
    llama_tokenizer = hf_models.load_tokenizer(llama_dir)
    hf_models.save_score_model(hf_models.new_score_model(llama_dir, bias=False), llama_tokenizer,
                               tmp_path / "rm", "sequence")
    argv = [
        "--policy", str(tiny_dir), "--reward", "seq", "--out", str(tmp_path / "out"),
        "--iterations", "1",
    ]
    with pytest.raises(
        common.InputError, match=f"--reward-model {tmp_path / 'rm'}: its tokenizer differs"
    ):
        ppo.main(argv + ["--reward-model", str(tmp_path / "rm")])
    with pytest.raises(common.InputError, match=f"{tiny_dir}: no trained score head"):
        ppo.main(argv + ["--reward-model", str(tiny_dir)])
    assert not (tmp_path / "out" / "log.jsonl").exists()


@pytest.mark.parametrize("reward", ["seq", "red"])
def test_seq_and_red_ignore_a_discriminator_and_name_the_reward_model(reward, tiny_dir, tmp_path):
    """--reward seq / red never read --discriminator: a folder that is no model at all is ignored
    with a warning, not refused; and the reward model the critic starts from is named by its option,
    not "critic"."""
    (tmp_path / "not_a_model").mkdir()
    argv = ["--policy", str(tiny_dir), "--reward", reward, "--out", str(tmp_path / "out"),
            "--iterations", "1", "--reward-model", str(tiny_dir),
            "--discriminator", str(tmp_path / "not_a_model")]
    with pytest.warns(UserWarning, match="does not use --discriminator"):
        assert ppo.parse_args(argv).discriminator is None
    refused = f"^--reward-model {tiny_dir}: no trained score head"
    with pytest.warns(UserWarning), pytest.raises(common.InputError, match=refused):
        ppo.main(argv)


def test_llama_policy_runs_ppo_with_bos_and_stops_at_a_second_eos_id(llama_dir, tmp_path):
    """The tiny Llama (RoPE, BOS, no pad token) through the PPO script, with a generation_config
    that lists a second EOS id: generation stops at it as at the first, in ppo_token.generate and in
    the script."""
    policy, tokenizer = hf_models.load_policy(llama_dir), hf_models.load_tokenizer(llama_dir)
    args = ppo.parse_args(["--policy", "p", "--out", "o", "--reward", "seq", "--reward-model", "r",
                           "--max-prompt-len", "24"])
    prompts = ppo_setup.load_prompts(args, tokenizer, quiet=True)[:16]
    assert all(
        ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
        for ids in prompts
    )
    prompt, prompt_mask = common.pad_left(prompts, tokenizer.pad_token_id)
    torch.manual_seed(0)
    free = ppo.generate(policy, prompt, prompt_mask, [tokenizer.eos_token_id],
                        tokenizer.pad_token_id, 24, top_p=1.0)
    # (pad is EOS: the rows after they ended hold it)
    sampled = free[free != tokenizer.eos_token_id]
    second_eos = int(torch.mode(sampled).values)  # the token this random model samples most
    torch.manual_seed(0)  # the same draws, now stopping at either id
    response = ppo.generate(policy, prompt, prompt_mask, [tokenizer.eos_token_id, second_eos],
                            tokenizer.pad_token_id, 24, top_p=1.0)
    mask, ended = ppo.response_mask_from(response, [tokenizer.eos_token_id, second_eos])
    assert ended.sum() > 0
    for row in range(len(response)):
        tokens = response[row, : int(mask[row].sum())].tolist()
        assert tokens == free[row, : len(tokens)].tolist()  # the same tokens up to the stop
        stops = [t for t in tokens if t in (tokenizer.eos_token_id, second_eos)]
        assert stops == ([tokens[-1]] if ended[row] else [])  # exactly one stop token, the last one

    policy.generation_config.eos_token_id = [tokenizer.eos_token_id, second_eos]
    policy.save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    assert common.eos_token_ids(tokenizer, hf_models.load_policy(tmp_path / "policy")) == [
        tokenizer.eos_token_id,
        second_eos,
    ]
    ppo.main(
        [
            "--policy", str(tmp_path / "policy"), "--reward", "tlcr", "--discriminator", "unused",
            "--critic-init", "policy", "--out", str(tmp_path / "ppo"), "--iterations", "2",
            "--rollout-batch-size", "16", "--minibatch-size", "8", "--max-prompt-len", "24",
            "--max-new-tokens", "24", "--limit", "16",
        ],
        reward_fn=toy_reward,
    )
    log = [json.loads(line) for line in (tmp_path / "ppo" / "log.jsonl").read_text().splitlines()]
    # the second id ends some
    assert [r["step"] for r in log] == [1, 2] and max(r["eos_fraction"] for r in log) > 0


def test_stop_after_then_resume_matches_an_uninterrupted_run(tiny_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert ppo.main(cli(tiny_dir, a, 3, "--stop-after", "2"), reward_fn=toy_reward) is None
    assert checkpoint.latest_checkpoint(a).name == "step-000000002" and not (a / "policy").exists()
    ppo.main(cli(tiny_dir, a, 3), reward_fn=toy_reward)
    ppo.main(cli(tiny_dir, b, 3), reward_fn=toy_reward)
    log_a = [json.loads(line) for line in (a / "log.jsonl").read_text().splitlines()]
    log_b = [json.loads(line) for line in (b / "log.jsonl").read_text().splitlines()]
    assert log_a[-1]["kl"] == pytest.approx(log_b[-1]["kl"], rel=1e-5, abs=1e-7)


# ----------------------------------------------------------------------------------------------
# The adaptive KL controller (--kl-target) and snapshots at KL targets (--save-at-kl)
# ----------------------------------------------------------------------------------------------
def test_adaptive_kl_coef_moves_beta_toward_the_target():
    # KL above the target: β up; below: β down; the error is clipped at ±20%
    assert ppo.adaptive_kl_coef(0.1, 1.1, 1.0, 100, 10) == pytest.approx(0.1 * (1 + 0.1 * 0.1))
    assert ppo.adaptive_kl_coef(0.1, 0.9, 1.0, 100, 10) == pytest.approx(0.1 * (1 - 0.1 * 0.1))
    assert ppo.adaptive_kl_coef(0.1, 5.0, 1.0, 100, 10) == pytest.approx(0.1 * 1.02)  # clipped
    assert ppo.adaptive_kl_coef(0.1, 0.0, 1.0, 100, 100) == pytest.approx(0.08)  # −20% per horizon
    assert ppo.adaptive_kl_coef(0.1, 1.0, 1.0, 100, 10) == 0.1  # on target: unchanged


def log_of(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def weights_equal(a, b):
    wa, wb = hf_models.load_policy(a).state_dict(), hf_models.load_policy(b).state_dict()
    return wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_kl_controller_in_a_run_follows_the_rollout_kl_and_resumes(tiny_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    controller = ("--kl-target", "0.05", "--kl-horizon", "8")  # 4 responses: up to ±10% a step
    ppo.main(cli(tiny_dir, a, 4, *controller), reward_fn=toy_reward)
    log = log_of(a)
    assert log[0]["kl_coef"] == pytest.approx(0.1)  # --kl-coef's default to start
    for row, after in itertools.pairwise(log):  # β up after a rollout above the target, else down
        assert after["kl_coef"] == pytest.approx(
            ppo.adaptive_kl_coef(row["kl_coef"], row["kl"], 0.05, 8, 4), rel=1e-6)
        assert (after["kl_coef"] > row["kl_coef"]) == (row["kl"] > 0.05)
    assert len({round(r["kl_coef"], 9) for r in log}) == 4  # β moved every step
    # interrupted and resumed: the same β as the uninterrupted run
    ppo.main(cli(tiny_dir, b, 4, *controller, "--stop-after", "2"), reward_fn=toy_reward)
    ppo.main(cli(tiny_dir, b, 4, *controller), reward_fn=toy_reward)
    assert [r["kl_coef"] for r in log_of(b)] == pytest.approx([r["kl_coef"] for r in log])
    # off by default: β stays --kl-coef
    ppo.main(cli(tiny_dir, tmp_path / "c", 2), reward_fn=toy_reward)
    assert [r["kl_coef"] for r in log_of(tmp_path / "c")] == [0.1, 0.1]


@pytest.mark.parametrize("model", ["gpt2", "llama"])
def test_snapshots_are_the_policy_that_crossed_each_kl_target(model, tiny_dir, llama_dir, tmp_path):
    policy_dir = tiny_dir if model == "gpt2" else llama_dir

    def run(out, steps, *extra):
        argv = cli(policy_dir, out, steps, "--limit", "16", *extra)
        return ppo.main(argv, reward_fn=toy_reward)

    run(tmp_path / "plain", 5)
    kls = [r["kl"] for r in log_of(tmp_path / "plain")]
    assert kls[0] == 0.0 and max(kls[1:]) > 0  # KL 0 at iteration 0, then the policy moves
    # targets: the first positive rollout KL (k1 can be negative, and which iteration reaches one
    # depends on the sampled tokens) and a value above any reached; window 1: each rollout's KL
    low, never = next(kl for kl in kls[1:] if kl > 0), max(kls) + 1.0
    out = tmp_path / "snap"
    run(out, 5, "--save-at-kl", f"{low!r}", f"{never!r}", "--save-kl-window", "1")
    assert [r["kl"] for r in log_of(out)] == pytest.approx(kls, rel=1e-5, abs=1e-7)  # no change
    first = next(i + 1 for i, kl in enumerate(kls) if kl >= low)  # the first iteration at ≥ low
    saved = ppo_setup.read_snapshots(out)
    assert set(saved) == {f"{low:g}"} and saved[f"{low:g}"]["iteration"] == first
    assert saved[f"{low:g}"]["rollout_kl"] == pytest.approx(kls[first - 1], rel=1e-5, abs=1e-7)
    assert not ppo_setup.snapshot_dir(out, never).exists()  # never reached: no snapshot
    assert not list(out.glob(".save-*"))  # the temp folder was renamed, not left behind
    # the snapshot is the policy before iteration `first`'s update: a run of first − 1 iterations
    run(tmp_path / "before", first - 1)
    assert weights_equal(ppo_setup.snapshot_dir(out, low), tmp_path / "before" / "policy")
    # a whole HF model folder
    tokenizer = hf_models.load_tokenizer(ppo_setup.snapshot_dir(out, low))
    assert tokenizer.bos_token_id == hf_models.load_tokenizer(policy_dir).bos_token_id
    # --stop-at-kl: the run ends with the iteration that saved the last target
    stop = tmp_path / "stop"
    run(stop, 5, "--save-at-kl", f"{low!r}", "--save-kl-window", "1", "--stop-at-kl")
    assert [r["step"] for r in log_of(stop)][-1] == first and (stop / "policy").exists()
    with pytest.raises(SystemExit):
        ppo.parse_args(["--policy", "p", "--out", "o", "--reward", "seq", "--reward-model", "r",
                        "--stop-at-kl"])  # no targets
    with pytest.raises(SystemExit):
        ppo.parse_args(["--policy", "p", "--out", "o", "--reward", "seq", "--reward-model", "r",
                        "--save-at-kl", "0"])

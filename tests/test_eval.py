"""eval.py: KL and perplexity by hand, win rates against a local judge server, the HTML report, end
to end."""
import json
import math
import re
import shutil
import statistics
from collections import Counter
from html.parser import HTMLParser

import pytest
import torch

import common
import eval as ev
import gold
import plumbing
import report
from chat_server import SECRET, ChatServer, key_fragment
from plumbing import chat, gpt_judge, hf_models


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: intra-op threads only add overhead (8 ms per sampling step on a busy 2-core
    box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------
# generation, KL, perplexity
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_policy(tiny_dir):
    return common.disable_dropout(hf_models.load_policy(tiny_dir)).eval()


def left_padded_batch(tokenizer, splits, n=3):
    encoded = [common.encode_prompt(tokenizer, p.prompt, 24) for p in splits["test"][:n]]
    encoded[0] = encoded[0][-7:]  # rows of different lengths: real left padding
    return common.pad_left(encoded, tokenizer.pad_token_id)


def sample(policy, prompt_ids, prompt_mask, max_new_tokens, eos_id, seed):
    torch.manual_seed(seed)
    return ev.generate_responses(policy, prompt_ids, prompt_mask, max_new_tokens, [eos_id], eos_id)


def test_generate_masks_after_first_eos(tiny_policy, tiny_tokenizer, splits):
    prompt_ids, prompt_mask = left_padded_batch(tiny_tokenizer, splits)
    eos = tiny_tokenizer.eos_token_id
    qr, am, rm = sample(tiny_policy, prompt_ids, prompt_mask, 12, eos, seed=0)
    P = prompt_ids.shape[1]
    assert qr.shape == am.shape == rm.shape and torch.equal(qr[:, :P], prompt_ids)
    assert torch.equal(am[:, P:], rm[:, P:]) and rm[:, :P].sum() == 0
    for row in range(qr.shape[0]):
        resp = qr[row, P:][rm[row, P:].bool()].tolist()
        assert eos not in resp[:-1]  # the response stops at (and includes) its first EOS
    # same seed, same responses
    qr2, _, _ = sample(tiny_policy, prompt_ids, prompt_mask, 12, eos, seed=0)
    assert torch.equal(qr, qr2)


def test_kl_of_a_model_against_itself_is_zero(tiny_policy, tiny_dir, tiny_tokenizer, splits):
    prompt_ids, prompt_mask = left_padded_batch(tiny_tokenizer, splits)
    qr, am, rm = sample(tiny_policy, prompt_ids, prompt_mask, 10, tiny_tokenizer.eos_token_id,
                        seed=1)
    _, valid = common.response_index(rm)
    with torch.no_grad():
        logprobs, _ = common.response_logprobs(tiny_policy, qr, am, rm)
        same, _ = common.response_logprobs(hf_models.load_policy(tiny_dir).eval(), qr, am, rm)
        other = hf_models.load_policy(tiny_dir).eval()
        other.transformer.h[0].mlp.c_fc.weight.add_(
            torch.randn_like(other.transformer.h[0].mlp.c_fc.weight))
        different, _ = common.response_logprobs(other, qr, am, rm)
    # a separate load
    assert ev.kl_to_reference(logprobs, same, valid) == {"kl": 0.0, "kl_per_token": 0.0}
    kl = ev.kl_to_reference(logprobs, different, valid)
    # Σ_t per response, mean over responses
    expected = ((logprobs - different) * valid).sum(-1).mean().item()
    assert kl["kl"] == pytest.approx(expected, rel=1e-6) and abs(kl["kl"]) > 1e-2
    # k1 by hand: Σ_t (log π − log π_ref) per response, mean over responses; per token over all
    # tokens
    lp = torch.tensor([[-1.0, -2.0, 9.0], [-0.5, 9.0, 9.0]])
    ref = torch.tensor([[-1.5, -2.5, 0.0], [-1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    kl = ev.kl_to_reference(lp, ref, mask)
    assert kl["kl"] == pytest.approx((1.0 + 0.5) / 2) and kl["kl_per_token"] == pytest.approx(
        1.5 / 3
    )


@pytest.mark.parametrize("model", ["gpt2", "llama"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_equal_a_scoring_forward(model, temperature, tiny_dir, llama_dir, splits):
    """The sampler's own log-probabilities (eval's KL in fp32, without the policy's forward) are
    those common.response_logprobs recomputes, token for token, on left-padded rows of different
    lengths and responses that end early; and the same draws as without them."""
    policy = common.disable_dropout(hf_models.load_policy(
        tiny_dir if model == "gpt2" else llama_dir)).eval()
    tokenizer = hf_models.load_tokenizer(tiny_dir if model == "gpt2" else llama_dir)
    prompt_ids, prompt_mask = left_padded_batch(tokenizer, splits, n=4)
    with torch.no_grad():
        torch.manual_seed(5)
        first = ev.generate_responses(policy, prompt_ids, prompt_mask, 16,
                                      [tokenizer.eos_token_id], tokenizer.pad_token_id, 0.9,
                                      temperature)[0]
        # row 0's 4th token ends a response too: the rows end at different lengths (checked below)
        stop = [tokenizer.eos_token_id, int(first[0, prompt_ids.shape[1] + 3])]
        torch.manual_seed(5)
        qr, am, rm, sampled = ev.generate_responses(policy, prompt_ids, prompt_mask, 16, stop,
                                                    tokenizer.pad_token_id, 0.9, temperature,
                                                    with_logprobs=True)
        torch.manual_seed(5)
        plain = ev.generate_responses(policy, prompt_ids, prompt_mask, 16, stop,
                                      tokenizer.pad_token_id, 0.9, temperature)
        scored, _ = common.response_logprobs(policy, qr, am, rm, temperature)
    _, valid = common.response_index(rm)
    lengths = valid.sum(-1)
    assert torch.equal(qr, plain[0]) and len(set(lengths.tolist())) > 1
    assert sampled.shape == scored.shape and torch.equal(sampled == 0, valid == 0)
    torch.testing.assert_close(sampled, scored, atol=2e-5, rtol=0)
    # and eval's score_batch takes them in place of its own policy forward: the same KL
    with torch.no_grad():
        reference = common.disable_dropout(hf_models.load_policy(tiny_dir if model == "gpt2"
                                                                 else llama_dir)).eval()
        given = ev.score_batch(policy, reference, None, None, qr, am, rm, temperature, False,
                               logprobs=sampled)
        computed = ev.score_batch(policy, reference, None, None, qr, am, rm, temperature, False)
    assert abs(ev.kl_to_reference(given["logprobs"], given["ref_logprobs"], valid)["kl"]
               - ev.kl_to_reference(computed["logprobs"], computed["ref_logprobs"], valid)["kl"]
               ) < 1e-4


def test_perplexity_matches_a_hand_computation(tiny_policy, tiny_tokenizer, splits):
    # numbers: probabilities 1/2, 1/4, 1/8 -> exp(mean NLL) = exp(2 ln 2) = 4; padding ignored
    logprobs = torch.log(torch.tensor([[0.5, 0.25], [0.125, 1e-9]]))
    assert ev.reference_perplexity(logprobs, torch.tensor([[1, 1], [1, 0]])) == pytest.approx(4.0)
    # a tiny model: the left-padded batch pipeline against a plain loop over unpadded rows
    prompt_ids, prompt_mask = left_padded_batch(tiny_tokenizer, splits)
    qr, am, rm = sample(tiny_policy, prompt_ids, prompt_mask, 8, tiny_tokenizer.eos_token_id,
                        seed=2)
    _, valid = common.response_index(rm)
    with torch.no_grad():
        ppl = ev.reference_perplexity(common.response_logprobs(tiny_policy, qr, am, rm)[0], valid)
        nll, count = 0.0, 0
        for row in range(qr.shape[0]):
            ids = qr[row][am[row].bool()]  # prompt + response, no padding
            n_resp = int(rm[row].sum())
            logits = tiny_policy(ids[None]).logits[0].double()
            for t in range(len(ids) - n_resp, len(ids)):
                probs = torch.softmax(logits[t - 1], -1)
                nll -= math.log(probs[ids[t]].item())
                count += 1
    assert ppl == pytest.approx(math.exp(nll / count), rel=1e-4)


# ----------------------------------------------------------------------------------------------
# judges and win rates
# ----------------------------------------------------------------------------------------------
def test_parse_verdict_is_strict():
    assert [gpt_judge.parse_verdict(t) for t in ["A", " b.", "Tie", "tie\n", "B"]] == [
        "A", "B", "tie", "tie", "B",
    ]
    assert [gpt_judge.parse_verdict(t)
            for t in ["Answer: A", "AB", "A or B", "", "neither"]] == [None] * 5


def test_pair_score_and_aggregation():
    assert ev.pair_score("A", "B") == 1.0  # policy first and wins, then second and wins
    assert ev.pair_score("A", "A") == 0.5  # position bias cancels
    assert ev.pair_score("tie", "B") == 0.75 and ev.pair_score("tie", "tie") == 0.5
    assert ev.pair_score("B", "A") == 0.0 and ev.pair_score(None, "A") is None
    agg = ev.aggregate_win_rate([1.0, 0.5, 0.75, 0.0, None])
    assert agg == {
        "win_rate": pytest.approx(56.25),
        "wins": 2,
        "ties": 1,
        "losses": 1,
        "judged": 4,
        "failed": 1,
    }
    rm = ev.reward_model_win_rate([1.0, 2.0, 3.0], [0.0, 2.0, 4.0])
    assert rm["win_rate"] == pytest.approx(50.0) and (rm["wins"], rm["ties"], rm["losses"]) == (
        1,
        1,
        1,
    )


def JudgeServer(decide, faults=()):
    """The chat server (tests/chat_server.py) playing the judge: `decide(prompt, a, b)` answers, and
    the behaviours in `faults` are served first, one per call, whoever asks. Each call is tagged by
    the conversation it judges; the client's test request is tagged "check"."""
    faults = list(faults)

    def answer(messages):
        text = messages[-1]["content"]
        m = re.search(
            r"\[Conversation\]\n(.*)\n\n\[Answer A\]\n(.*)\n\n\[Answer B\]\n(.*)\n\nWhich", text,
            re.S)
        return ("check", "OK") if m is None else (m.group(1), decide(*m.groups()))

    return ChatServer(answer, lambda tag, n: faults.pop(0) if faults else "ok")


@pytest.fixture
def judge_server():
    servers = []

    def start(decide, faults=()):
        servers.append(JudgeServer(decide, faults))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def make_judge(server, tmp_path, **kw):
    kw = {"timeout": 0.5, "max_retries": 3, "backoff": 0.01, "concurrency": 4, **kw}
    return gpt_judge.OpenAIJudge(server.url, "judge-model", tmp_path / "cache.jsonl",
                                 api_key=SECRET, **kw)


PROMPTS = [f"\n\nHuman: question {i}?\n\nAssistant:" for i in range(4)]
POLICY = [f"good answer {i}" for i in range(4)]
BASELINE = [f"bad answer {i}" for i in range(4)]


def test_judge_that_always_prefers_the_first_position_gives_50_percent(judge_server, tmp_path):
    server = judge_server(lambda prompt, a, b: "A")
    result = ev.openai_win_rate(make_judge(server, tmp_path), PROMPTS, POLICY, BASELINE)
    assert result["win_rate"] == pytest.approx(50.0)
    assert (result["wins"], result["ties"], result["losses"], result["failed"]) == (0, 4, 0, 0)
    assert len(server.calls) == 8  # every pair in both orders


def test_win_rate_with_swapping_ties_faults_and_cache(judge_server, tmp_path):
    def decide(prompt, a, b):
        i = int(re.search(r"question (\d)", prompt).group(1))
        policy_is_a = a.startswith("good")
        if i == 0:
            return "A" if policy_is_a else "B"  # policy wins in both orders: 1
        if i == 1:
            return "A"  # position bias: ½
        if i == 2:
            return "tie" if policy_is_a else "B"  # tie, then a win: ¾
        return "B" if policy_is_a else "A"  # baseline wins in both orders: 0

    server = judge_server(
        decide,
        faults=["429:0", "500", "badjson", "say:I think A", "slow:1.0", "null", "trickle:0.2"])
    prompts, policy, baseline = (
        PROMPTS + ["\n\nHuman: same?\n\nAssistant:"],
        POLICY + [" same"],
        BASELINE + ["same "],
    )
    judge = make_judge(server, tmp_path)
    result = ev.openai_win_rate(judge, prompts, policy, baseline)
    # identical answers: a tie, no call; (1 + ½ + ¾ + 0 + ½) / 5
    assert result["win_rate"] == pytest.approx(100 * 2.75 / 5)
    assert (result["wins"], result["ties"], result["losses"], result["judged"]) == (2, 2, 1, 5)
    assert len(server.calls) == 8 + 7  # 4 pairs × 2 orders, plus one retry per injected fault
    assert {auth for *_, auth in server.calls} == {f"Bearer {SECRET}"}
    cache_text = (tmp_path / "cache.jsonl").read_text()
    assert len(cache_text.splitlines()) == 8 and SECRET not in cache_text
    # a rerun pays nothing: every verdict comes from the cache file
    again = ev.openai_win_rate(make_judge(server, tmp_path), prompts, policy, baseline)
    assert again == result and len(server.calls) == 15


def test_judge_fatal_error_hides_the_key_and_exhausted_retries_count_as_failed(
        judge_server, tmp_path):
    server = judge_server(lambda *a: "A", faults=["401"])
    with pytest.raises(chat.ChatFatal) as info:
        ev.openai_win_rate(make_judge(server, tmp_path, concurrency=1), PROMPTS[:1], POLICY[:1],
                           BASELINE[:1])
    assert "401" in str(info.value) and SECRET not in str(info.value)
    # max_retries=3: the first order fails
    server = judge_server(lambda *a: "A", faults=["500"] * 4)
    result = ev.openai_win_rate(make_judge(server, tmp_path / "x", concurrency=1, max_retries=3),
                                PROMPTS[:1], POLICY[:1], BASELINE[:1])
    assert result["failed"] == 1 and result["judged"] == 0 and result["win_rate"] is None


def test_a_rerun_asks_the_judge_again_only_for_transient_failures(judge_server, tmp_path, capsys):
    """An answer that came back and is not A / B / tie is kept as a failure in the cache and not
    paid for again by a rerun unless retry_failed (--retry-failed); a 500 is asked again. Before,
    failures were not cached and every rerun re-asked them with the full retry budget."""
    faults = ["say:maybe"] * 2 + ["500"] * 2  # order 0, then order 1
    server = judge_server(lambda *a: "A", faults=faults)
    result = ev.openai_win_rate(make_judge(server, tmp_path, concurrency=1, max_retries=1),
                                PROMPTS[:1], POLICY[:1], BASELINE[:1])
    assert result["failed"] == 1 and len(server.calls) == 4
    judge = make_judge(server, tmp_path, concurrency=1, max_retries=1)
    result = ev.openai_win_rate(judge, PROMPTS[:1], POLICY[:1], BASELINE[:1])
    assert result["failed"] == 1 and len(server.calls) == 5  # the 500's order only, answered now
    assert chat.failure_counts(judge.failures) == {"transient": 0, "unusable": 1}
    judge = make_judge(server, tmp_path, concurrency=1, max_retries=1, retry_failed=True)
    result = ev.openai_win_rate(judge, PROMPTS[:1], POLICY[:1], BASELINE[:1])
    assert result["failed"] == 0 and result["win_rate"] == 50.0 and len(server.calls) == 6


def test_judge_errors_never_show_the_key_at_any_offset(judge_server, tmp_path):
    """The judge server answers 401 with the key at character offset k of its body, for every k up
    to past the snippet: before the fix the body was cut at 300 characters, then scrubbed, and up to
    55 of the key's 56 characters reached the error."""
    offsets = range(chat.SNIPPET_CHARS + 2)
    server = judge_server(lambda *a: "A", faults=[f"echo401:{k}" for k in offsets])
    judge = make_judge(server, tmp_path)
    for k in offsets:
        with pytest.raises(chat.ChatFatal) as info:
            gpt_judge.judge_verdict(judge, PROMPTS[0], POLICY[0], BASELINE[0])
        assert "HTTP 401" in str(info.value) and "\n" not in str(info.value)
        assert key_fragment(str(info.value)) < 4, (k, str(info.value))
    assert len(server.calls) == len(offsets)  # a 401 is never retried


def test_judge_asks_again_after_a_null_answer(judge_server, tmp_path):
    # before the fix: no retry, a failed verdict
    server = judge_server(lambda *a: "B", faults=["null"])
    judge = make_judge(server, tmp_path)
    assert (
        gpt_judge.judge_verdict(judge, PROMPTS[0], POLICY[0], BASELINE[0]) == "B"
        and len(server.calls) == 2
    )


def test_judge_cache_survives_a_torn_last_line(judge_server, tmp_path, capsys):
    """A run killed mid-write leaves a torn last line. Before the fix the next verdict was appended
    onto it, so that line stayed unreadable and the verdict was paid for again on every rerun."""
    server = judge_server(lambda *a: "A")
    judge = make_judge(server, tmp_path)
    assert gpt_judge.judge_verdict(judge, PROMPTS[0], POLICY[0], BASELINE[0]) == "A"
    judge.cache.close()
    cache = tmp_path / "cache.jsonl"
    cache.write_text(cache.read_text() + '{"key": "0123", "verd')  # the kill
    judge = make_judge(server, tmp_path)
    assert "line 2: unreadable" in capsys.readouterr().err
    assert gpt_judge.judge_verdict(judge, PROMPTS[1], POLICY[1], BASELINE[1]) == "A"
    judge.cache.close()
    assert len(server.calls) == 2
    judge = make_judge(server, tmp_path)  # the next run finds both verdicts
    assert gpt_judge.judge_verdict(judge, PROMPTS[0], POLICY[0], BASELINE[0]) == "A"
    assert gpt_judge.judge_verdict(judge, PROMPTS[1], POLICY[1], BASELINE[1]) == "A"
    assert len(server.calls) == 2


def test_results_markdown_escapes_a_pipe_in_policy_and_baseline_names():
    results = {"baseline": "sft|v2", "judge": "reward-model", "split": "test", "num_prompts": 2,
               "policies": {"sft|v2": {k: 1.0 for k, _, _ in report.COLUMNS},
                            "tlcr|a": {**{k: 2.0 for k, _, _ in report.COLUMNS}, "win_rate": 62.5}}}
    rows = [line for line in report.results_markdown(results).splitlines() if line.startswith("|")]
    columns = [len(re.findall(r"(?<!\\)\|", row)) - 1 for row in rows]  # unescaped pipes
    # before the fix the header had one more
    assert len(rows) == 4 and columns == [len(report.COLUMNS) + 2] * 4, columns
    assert "Win rate vs sft\\|v2" in rows[0]


# ----------------------------------------------------------------------------------------------
# the report
# ----------------------------------------------------------------------------------------------
class TagBalance(HTMLParser):
    VOID = {
        "meta",
        "br",
        "hr",
        "img",
        "input",
        "link",
        "area",
        "base",
        "col",
        "embed",
        "source",
        "track",
        "wbr",
    }

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.tags, self.data = [], [], Counter(), []

    def handle_starttag(self, tag, attrs):
        self.tags[tag] += 1
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.data.append(data)


def check_html(text):
    assert text.startswith("<!DOCTYPE html>")
    parser = TagBalance()
    parser.feed(text)
    parser.close()
    assert parser.errors == [] and parser.stack == [], (parser.errors, parser.stack)
    return parser


def test_report_is_valid_html_with_table_curves_shaded_tokens_and_escaped_text(tmp_path):
    results = {
        "baseline": "sft",
        "judge": "reward-model",
        "split": "test",
        "num_prompts": 2,
        "seed": 0,
        "discriminator_accuracy": {
            "accuracy": 0.75,
            "positive_accuracy": 0.8,
            "negative_accuracy": 0.7,
            "n_positive": 10,
            "n_negative": 10,
        },
        "policies": {
            "sft": {k: 1.0 for k, _, _ in report.COLUMNS},
            "tlcr<i>": {**{k: 2.0 for k, _, _ in report.COLUMNS}, "win_rate": 62.5},
        },
    }
    evil = ["Sure", " <script>", "alert(1)", "</script>", " & <b>bold"]
    samples = [
        {
            "prompt": "\n\nHuman: <script>x</script>?\n\nAssistant:",
            "responses": {
                "sft": {
                    "tokens": evil,
                    "tlcr": [0.9, -0.8, 0.0, 0.1, -0.2],
                    "red": [1, -2, 0, 3, -1],
                },
                "tlcr<i>": {"tokens": ["Hi"], "tlcr": [0.5], "red": [-0.5]},
            },
        }
    ]
    for run in ("seq", "tlcr"):
        (tmp_path / run).mkdir()
        lines = [
            json.dumps(
                {
                    "step": s,
                    "task_reward": s * 0.1,
                    "kl": 0.01 * s,
                    "response_length": 20 + s,
                    "perplexity": 5 - 0.1 * s,
                    "rm_score": -1 + s / 5,
                }
            )
            for s in range(1, 6)
        ]
        (tmp_path / run / "log.jsonl").write_text("\n".join(lines) + "\n{broken")
    curves = report.training_curves({r: tmp_path / r / "log.jsonl" for r in ("seq", "tlcr")})
    assert len(curves) == 5 and all(len(s) == 2 and len(s["seq"]) == 5 for s in curves.values())
    page = report.report_html(results, samples, curves)
    parser = check_html(page)
    # the table: one row per policy, the win rate, escaped policy names
    assert parser.tags["table"] == 1 and parser.tags["tr"] == 3
    assert "62.5" in page and "baseline" in page and "tlcr&lt;i&gt;" in page
    # the curves: five SVG charts (RM score, task reward, KL, length, perplexity), one line per run
    # in each
    assert parser.tags["svg"] == 5 and parser.tags["polyline"] == 10
    # the shaded tokens: TLCR and RED rows, value on hover, green for positive and red for negative
    assert parser.tags["span"] >= 2 * (5 + 1)
    assert 'title="TLCR +0.9000"' in page and 'title="RED -2.0000"' in page
    # 0.9 / 1 and 2 / 3 × 0.85
    assert "rgba(34,160,60,0.77)" in page and "rgba(214,39,40,0.57)" in page
    # model text is escaped: no script or b tag, the text shows as text
    assert parser.tags["script"] == 0 and parser.tags["b"] == 0 and "<script>" not in page
    assert "&lt;script&gt;" in page and "&amp; &lt;b&gt;bold" in page
    assert "<script>" in "".join(parser.data)  # what the reader sees
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")  # self-contained
    md = report.results_markdown(results)
    assert md.count("\n| ") == 3 and "| sft |" in md and "62.5 |" in md and "75.0%" in md


# ----------------------------------------------------------------------------------------------
# end to end
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_dir, tiny_tokenizer, splits):
    """A run layout of untrained tiny models: RM and discriminator with fresh heads, a copy of the
    SFT model, another policy with changed weights and a PPO log, and a small labels file."""
    root = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    hf_models.save_score_model(hf_models.new_score_model(tiny_dir, bias=False), tiny_tokenizer,
                               root / "rm", "sequence")
    hf_models.save_score_model(hf_models.new_score_model(tiny_dir, bias=True), tiny_tokenizer,
                               root / "disc", "token")
    shutil.copytree(tiny_dir, root / "copy")  # the same weights, loaded separately
    other = hf_models.load_policy(tiny_dir)
    with torch.no_grad():
        other.transformer.h[1].mlp.c_proj.weight.mul_(3.0)
    other.save_pretrained(root / "ppo_other" / "policy")
    tiny_tokenizer.save_pretrained(root / "ppo_other" / "policy")
    (root / "ppo_other" / "log.jsonl").write_text(
        "".join(json.dumps({"step": s, "task_reward": s, "kl": s / 10}) + "\n" for s in range(1, 4))
    )
    labels = []
    for pair in splits["reward"][:4]:
        ids = tiny_tokenizer(pair.rejected, add_special_tokens=False)["input_ids"][:12]
        rev = tiny_tokenizer(pair.chosen, add_special_tokens=False)["input_ids"][:12]
        labels.append(
            {
                "id": pair.id,
                "prompt": pair.prompt,
                "rejected_ids": ids,
                "revised_ids": rev,
                "tokenizer": hf_models.tokenizer_fingerprint(tiny_tokenizer),
                "rejected_labels": [-1 if j % 2 else 0 for j in range(len(ids))],
                "revised_labels": [1 if j % 3 else 0 for j in range(len(rev))],
            }
        )
    (root / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in labels))
    return root


def eval_argv(tiny_dir, root, out, *policies):
    return [
        "--policies", *policies, "--reference", str(tiny_dir), "--reward-model", str(root / "rm"),
        "--discriminator", str(root / "disc"), "--num-prompts", "5", "--eval-batch-size", "3",
        "--max-new-tokens", "10", "--show-prompts", "2", "--out", str(out), "--device", "cpu",
    ]


def test_report_to_tensorboard_holds_every_policys_metrics(tiny_dir, run_dir, tmp_path):
    from test_trackers import read_tensorboard

    out = tmp_path / "eval"
    policies = f"sft={tiny_dir}", f"copy={run_dir / 'copy'}"
    results = ev.main(eval_argv(tiny_dir, run_dir, out, *policies) + ["--report-to", "tensorboard"])
    scalars = read_tensorboard(out / "tensorboard")
    expected = {f"{name}/{k}": v for name, m in results["policies"].items() for k, v in m.items()
                if isinstance(v, (int, float))}
    assert set(scalars) == set(expected) and "copy/win_rate" in scalars
    for tag, value in expected.items():
        assert scalars[tag] == {0: pytest.approx(value, rel=1e-6, abs=1e-7)}, tag


def test_main_end_to_end_with_reward_model_judge(tiny_dir, run_dir, tmp_path):
    out = tmp_path / "eval"
    results = ev.main(
        eval_argv(tiny_dir, run_dir, out, f"sft={tiny_dir}", f"copy={run_dir / 'copy'}",
                  f"other={run_dir / 'ppo_other' / 'policy'}")
        + ["--labels", str(run_dir / "labels.jsonl"), "--labels-split", "all"]
    )
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    pol = on_disk["policies"]
    assert list(pol) == ["sft", "copy", "other"] and on_disk["baseline"] == "sft"
    # the reference's weights, loaded from another folder
    assert pol["copy"]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert abs(pol["other"]["kl_per_token"]) > 1e-3
    # the same seed for every policy: the copy answers exactly like the baseline -> all ties
    assert pol["copy"]["rm_score"] == pytest.approx(pol["sft"]["rm_score"], abs=1e-5)
    assert pol["copy"]["win_rate"] == 50.0 and pol["copy"]["ties"] == 5
    assert pol["other"]["judged"] == 5 and "win_rate" not in pol["sft"]
    # same responses
    assert pol["copy"]["tlcr_reward"] == pytest.approx(pol["sft"]["tlcr_reward"], abs=1e-6)
    assert pol["copy"]["ref_perplexity"] == pytest.approx(pol["sft"]["ref_perplexity"], rel=1e-6)
    assert pol["other"]["ref_perplexity"] != pytest.approx(pol["sft"]["ref_perplexity"], rel=1e-3)
    responses = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    assert len(responses) == 15
    # the EOS share is the share of this policy's responses that ended at EOS
    for name, row in pol.items():
        ended = [r["ended_at_eos"] for r in responses if r["policy"] == name]
        assert row["eos_share"] == pytest.approx(sum(ended) / 5)
    # every labelled token of the file was counted (--labels-split all; 12 ids per side, all within
    # the limits)
    labels = [json.loads(line) for line in (run_dir / "labels.jsonl").read_text().splitlines()]
    acc = on_disk["discriminator_accuracy"]
    assert acc["n_positive"] == sum(r["revised_labels"].count(1) for r in labels)
    assert acc["n_negative"] == sum(r["rejected_labels"].count(-1) for r in labels)
    assert [r["response"] for r in responses if r["policy"] == "sft"] == \
        [r["response"] for r in responses if r["policy"] == "copy"]
    md = (out / "results.md").read_text()
    assert md.count("\n| ") == 4 and "| copy |" in md
    page = (out / "report.html").read_text()
    parser = check_html(page)
    # the PPO log found beside the policy dir: task reward and KL curves; header + 3 table rows
    assert parser.tags["svg"] == 2 and parser.tags["tr"] == 4
    assert page.count('title="TLCR ') >= 2 * 3 and page.count('title="RED ') >= 2 * 3


def test_main_stops_on_a_bad_judge_key_before_generating(
        tiny_dir, run_dir, tmp_path, judge_server, monkeypatch, capsys):
    """Before the fix a 401 came as a traceback, after every policy had been generated and scored;
    then as exit code 1 without the `error:` prefix. Now: one line `error: --judge openai: ...`,
    exit code 2."""
    def no_generation(*args, **kwargs):
        raise AssertionError("generated before the judge was checked")

    monkeypatch.setattr(ev, "generate_responses", no_generation)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    server = judge_server(lambda *a: "A", faults=["echo401:250"])
    argv = eval_argv(
        tiny_dir, run_dir, tmp_path / "eval", f"sft={tiny_dir}", f"copy={run_dir / 'copy'}"
    ) + ["--judge", "openai", "--api-base", server.url, "--api-model", "no-such-model"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        plumbing.cli(lambda: ev.main(argv))
    message = capsys.readouterr().err
    assert info.value.code == 2 and message.startswith("error: --judge openai: HTTP 401 from ")
    assert message.count("\n") == 1 and key_fragment(message) < 4 and len(server.calls) == 1
    monkeypatch.delenv("OPENAI_API_KEY")  # a remote judge without a key: one line, no request
    with pytest.raises(SystemExit) as info:
        plumbing.cli(lambda: ev.main(argv[:-4] + ["--api-base", "https://judge.example.com/v1"]))
    message = capsys.readouterr().err
    assert info.value.code == 2
    assert message.startswith("error: --judge openai: set the OPENAI_API_KEY environment variable")


def test_main_with_openai_judge_pays_once(tiny_dir, run_dir, tmp_path, judge_server, monkeypatch):
    server = judge_server(lambda prompt, a, b: "A", faults=["429:0"])
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    out = tmp_path / "eval"
    argv = eval_argv(tiny_dir, run_dir, out, f"sft={tiny_dir}", f"copy={run_dir / 'copy'}",
                     f"other={run_dir / 'ppo_other' / 'policy'}") + [
        "--judge", "openai", "--api-base", server.url, "--api-model", "local-judge",
        "--baseline", "copy",
    ]
    results = ev.main(argv)
    pol = results["policies"]
    assert results["baseline"] == "copy" and results["judge"] == "openai:local-judge"
    assert pol["sft"]["win_rate"] == 50.0 and pol["sft"]["ties"] == 5  # identical answers: no call
    assert pol["other"]["win_rate"] == 50.0 and pol["other"]["judged"] == 5  # position bias cancels
    # the test request (which met the 429 and was retried), then each pair where "other" answered
    # differently (how many: a matter of the sampled tokens, 5 of 5 before the sampler drew its
    # exponentials in vocabulary order) in 2 orders
    differing = (len(server.calls) - 2) // 2
    assert [c[0] for c in server.calls[:2]] == ["check", "check"] and differing >= 1
    assert all(c[0] != "check" for c in server.calls[2:]) and len(server.calls) == 2 + 2 * differing
    for path in out.iterdir():
        assert SECRET not in path.read_text()
    ev.main(argv)  # a rerun: every verdict from judge_cache.jsonl, only the test request is paid
    assert len(server.calls) == 2 + 2 * differing + 1 and server.calls[-1][0] == "check"


# ----------------------------------------------------------------------------------------------
# the true token credit (--gold): every source on held-out replies and on each policy's samples
# ----------------------------------------------------------------------------------------------
def test_main_gold_measures_token_credit_on_heldout_replies_and_samples(
        tiny_dir, tiny_tokenizer, run_dir, tmp_path, monkeypatch, splits):
    out = tmp_path / "eval"
    argv = eval_argv(tiny_dir, run_dir, out, f"sft={tiny_dir}", f"copy={run_dir / 'copy'}") + [
        "--gold", "--num-prompts", "20", "--credit-response-len", "40"]
    results = ev.main(argv)
    credit = results["credit"]
    pairs = splits["test"][:20]
    ranked, _ = gold.rank_pairs(pairs)
    revised = sum(gold.gold_revise(p.rejected) is not None for p in ranked)
    assert (
        credit["heldout"]["replies"] == {"chosen": 20, "rejected": 20, "revised": revised}
        and revised > 0
    )
    held = credit["heldout"]["by_source"]
    assert (
        set(held)
        == set(ev.CREDIT_SOURCES)
        == {"tlcr", "tlcr_fixed", "tlcr_no_negative", "tlcr_no_positive", "red", "seq"}
    )
    rows = ev.heldout_credit_replies(pairs, tiny_tokenizer, 24, 40)
    # every token of every reply, EOS included
    assert held["tlcr"]["tokens"] == sum(len(r) for _, _, r in rows)
    assert held["tlcr"]["harm_tokens"] > 0 and held["tlcr"]["safe_tokens"] > 0
    assert all(m["tokens"] == held["tlcr"]["tokens"] for m in held.values())
    # the same responses (the copy of the reference) give the same credit metrics
    assert credit["samples"]["sft"] == credit["samples"]["copy"]
    md = (out / "results.md").read_text()
    assert "Token credit on held-out replies (20 chosen, 20 rejected" in md and "| red |" in md
    page = (out / "report.html").read_text()
    check_html(page)
    assert page.count('title="gold credit ') >= 2 * 3 and "True token credit" in page
    assert json.loads((out / "results.json").read_text())["credit"] == json.loads(
        json.dumps(credit)
    )

    # a reward source that IS the gold credit scores perfectly: rows and replies line up token by
    # token
    def gold_as_reward(reward_model, disc_model, query_response, attention_mask, response_mask):
        ids = common.gather_response(query_response, response_mask)  # [B, T_resp]
        _, valid = common.response_index(response_mask)
        exact = torch.zeros(ids.shape)
        for row in range(ids.shape[0]):
            n = int(valid[row].sum())
            credit, words = gold.token_credit(tiny_tokenizer, ids[row, :n].tolist())
            counts = Counter(words)
            exact[row, :n] = torch.tensor(
                [c / counts[w] if w >= 0 else 0.0 for c, w in zip(credit, words)])
        late = torch.nn.functional.pad(exact, (1, 0))[:, :-1]  # one token late
        return {**{name: exact for name in ev.CREDIT_SOURCES}, "red": late}

    monkeypatch.setattr(ev, "source_token_rewards", gold_as_reward)
    held = ev.main(argv[:-2] + ["--credit-response-len", "40", "--out", str(tmp_path / "exact")]
                   )["credit"]["heldout"]["by_source"]
    assert held["tlcr"]["auc_harm"] == held["tlcr"]["auc_safe"] == 1.0
    assert held["tlcr"]["word_r"] == pytest.approx(1.0) and held["tlcr"][
        "reply_r"
    ] == pytest.approx(1.0)
    # off by one token: far worse
    assert held["red"]["auc_harm"] < 0.8 and held["red"]["word_r"] < 0.5


@pytest.mark.parametrize("model", ["gpt2", "llama"])
def test_gold_only_samples_k_replies_per_prompt_with_common_random_numbers(
        model, tiny_dir, llama_dir, run_dir, tmp_path, splits):
    """--gold-only --samples-per-prompt K: K replies per prompt, in a row; the same draws for every
    policy (a copy of the reference answers exactly as the reference); gold and KL as the full
    eval measures them on the same draws; no reward model or discriminator needed."""
    reference = tiny_dir if model == "gpt2" else llama_dir
    copy = tmp_path / "copy"
    shutil.copytree(reference, copy)
    argv = ["--policies", f"sft={reference}", f"copy={copy}", "--reference", str(reference),
            "--num-prompts", "4", "--samples-per-prompt", "3", "--eval-batch-size", "5",
            "--max-new-tokens", "10", "--device", "cpu"]
    fast = ev.main(argv + ["--gold-only", "--out", str(tmp_path / "fast")])
    assert fast["num_prompts"] == 4 and fast["samples_per_prompt"] == 3 and fast["credit"] is None
    assert fast["judge"] == "none" and "rm_score" not in fast["policies"]["sft"]
    rows = [json.loads(line) for line in (tmp_path / "fast" / "responses.jsonl").open()]
    prompts = [p.prompt for p in splits["test"][:4]]
    for name in ("sft", "copy"):
        mine = [r for r in rows if r["policy"] == name]
        assert [r["prompt"] for r in mine] == [p for p in prompts for _ in range(3)]
        assert fast["policies"][name]["gold_score"] == pytest.approx(
            sum(r["gold_score"] for r in mine) / 12)
        assert fast["policies"][name]["gold_score_se"] == pytest.approx(
            statistics.stdev(r["gold_score"] for r in mine) / 12**0.5)
    assert [r["response"] for r in rows if r["policy"] == "sft"] == [
        r["response"] for r in rows if r["policy"] == "copy"]  # common random numbers
    assert len({r["response"] for r in rows if r["policy"] == "sft"}) > 4  # K different replies
    assert fast["policies"]["copy"]["kl"] == pytest.approx(0.0, abs=1e-6)
    if model == "gpt2":  # the full eval on the same draws: the same gold and KL
        full = ev.main(argv + ["--gold", "--reward-model", str(run_dir / "rm"), "--discriminator",
                               str(run_dir / "disc"), "--out", str(tmp_path / "full")])
        for name in ("sft", "copy"):
            for key in ("gold_score", "kl", "response_length", "eos_share"):
                assert fast["policies"][name][key] == pytest.approx(full["policies"][name][key])
    with pytest.raises(SystemExit):  # without --gold-only the reward model is required
        ev.parse_args(argv[:-2] + ["--discriminator", "d"])
    with pytest.raises(SystemExit):
        ev.parse_args(argv + ["--gold-only", "--judge", "openai"])
    with pytest.raises(SystemExit):
        ev.parse_args(argv + ["--gold-only", "--samples-per-prompt", "0"])

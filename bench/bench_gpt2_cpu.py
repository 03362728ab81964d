"""The `gpt2` preset's shape on a CPU: one step (PPO: one iteration) of every stage on a random
GPT-2-124M, with LoRA too, a tiny batch, and each stage's peak host memory against the planner.

    python bench/bench_gpt2_cpu.py      # ~35 min on 2 busy cores; bench_gpt2_cpu.json

The model is GPT-2-124M's published shape (12 layers, 768 wide, 12 heads, 1024 positions) built from
its config with random weights, and the project's tokenizer: a byte-level BPE trained on the bundled
data with GPT-2's vocabulary size asked for (it reaches ~13k tokens; the model keeps GPT-2's 50257
embedding rows, the 124M shape). Nothing is downloaded. The stages run with the `gpt2` preset of
run_pipeline.sh (512 prompt + 256 response tokens, PPO 128 new tokens, gradient checkpointing, its
learning rates) but a tiny batch: micro-batch 2, one micro-batch per step, PPO rollout 2 and one PPO
epoch. The precision is fp32, the CPU default (this CPU's bf16 matmuls run ~60× slower than its fp32
ones: a bf16 step of this size would take hours, so bf16 against fp32 is left out here:
tests/test_precision.py covers it on tiny models).

It is bench/gpu_check.py on the CPU with these settings: every stage in its own subprocess, whose
peak RSS growth (ru_maxrss minus the RSS before the stage's models are loaded) is the measured peak;
the planner's figure is bench/plan_memory.py's plan() for the same shape, micro-batch, lengths and
precision (fp32), and error = measured / planned − 1. Host memory holds more than a GPU would (the
stage's Python objects, the allocator's free lists, safetensors pages read while loading): a
positive error of some percent is expected.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import common  # noqa: E402
import gpu_check  # noqa: E402
import plan_memory  # noqa: E402
from plumbing import hf_models  # noqa: E402


def main(argv=None):
    pairs = common.load_pairs(common.BUNDLED_DATA, quiet=True)
    tokenizer = hf_models.configure_tokenizer(
        hf_models.train_tiny_tokenizer([p.prompt + p.chosen for p in pairs], vocab_size=50257))
    # vocabulary 50257: GPT-2's embedding and LM head, 124M parameters
    config = plan_memory.load_config("gpt2")
    config.bos_token_id = config.eos_token_id = 1
    config.pad_token_id = 0
    print(
        f"GPT-2-124M shape ({config.vocab_size} embedding rows); the project's BPE on the bundled "
        f"data has {len(tokenizer)} tokens (as many merges as the data allows; the bench feeds "
        "random ids over all the rows)"
    )
    defaults = [
        "--device", "cpu", "--precision", "fp32", "--steps", "1", "--micro-batch", "2",
        "--micro-batches", "1", "--rollout-batch", "2", "--ppo-epochs", "1", "--isolate",
        "--no-agreement", "--stages", "sft,sft_lora,discriminator,reward,ppo,ppo_lora,sft_fsdp",
        "--out", "bench_gpt2_cpu.json",
    ]
    return gpu_check.main(defaults + list(argv if argv is not None else sys.argv[1:]),
                          {"gpt2": config}, tokenizer)


if __name__ == "__main__":
    main()

"""Host memory of loading a model for FSDP: every rank reading the whole model, or rank 0 alone
(--fsdp).

With --fsdp, hf_models.load_policy(meta=True) builds the model on the meta device on every rank
but 0, and distributed.shard_model sends each rank its pieces of rank 0's weights. This measures
what that saves: the growth of each rank's peak resident set (VmHWM) while one model is loaded
and sharded, both ways, on 2 gloo processes on the CPU, for two GPT-2s of ~50 M parameters saved
in fp32:
    vocab 8192, 16 layers x 512   the embedding is 2 % of the weights, as in a 7B model
    vocab 50257, 8 layers x 512   the embedding is half the weights (it travels whole: no gain
                                  for it)

    python bench/bench_fsdp_load.py          # ~2 min on 2 CPU cores
"""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from plumbing import distributed, hf_models  # noqa: E402

SHAPES = {
    "vocab 8192, 16 x 512": dict(
        n_layer=16, n_embd=512, n_head=8, vocab_size=8192, bos_token_id=0, eos_token_id=0
    ),
    "vocab 50257, 8 x 512": dict(n_layer=8, n_embd=512, n_head=8),
}


def rss_mib(field: str) -> float:
    line = next(line for line in open("/proc/self/status") if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def launched(model_dir: str, how: str):
    """One rank: warm up (imports, a toy shard), then load + shard the model; report the growth."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.set_num_threads(1)
    hf_models._quiet_transformers()
    dist_info = distributed.setup_distributed("cpu", fsdp=True)
    distributed.shard_model(
        GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16)), dist_info)
    before = rss_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    meta = dist_info.meta if how == "rank 0 loads" else False
    model = distributed.shard_model(hf_models.load_policy(model_dir, meta=meta), dist_info)
    result = {
        "rank": dist_info.rank,
        "peak_growth_mib": round(rss_mib("VmHWM") - before),
        "shard_mib": round(
            sum(p.to_local().numel() * p.element_size() for p in model.parameters()) / 2**20
        ),
    }
    everyone = [None] * dist_info.world_size
    torch.distributed.all_gather_object(everyone, result)
    if dist_info.master:
        print("RESULT " + json.dumps(everyone))
    distributed.cleanup_distributed(dist_info)


def main():
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_models._quiet_transformers()
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "MALLOC_TRIM_THRESHOLD_": "0",
    }
    with tempfile.TemporaryDirectory() as tmp:
        for shape, config in SHAPES.items():
            model = GPT2LMHeadModel(GPT2Config(**config))
            n_params = sum(p.numel() for p in model.parameters())
            largest = max(p.numel() for p in model.parameters())
            model.save_pretrained(Path(tmp) / "model")
            del model
            print(
                f"{shape}: {n_params / 1e6:.1f} M parameters, {n_params * 4 / 2**20:.0f} MiB in "
                "fp32, largest "
                f"tensor {largest * 4 / 2**20:.0f} MiB; growth of the peak RSS while loading + "
                "sharding:"
            )
            for how in ("every rank loads", "rank 0 loads"):
                done = subprocess.run(
                    [
                        sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", __file__, str(Path(tmp) / "model"), how,
                    ],
                    capture_output=True,
                    text=True,
                    env=env,
                    timeout=600,
                )
                line = next((s for s in done.stdout.splitlines() if s.startswith("RESULT ")), None)
                if line is None:
                    raise SystemExit(done.stdout[-2000:] + done.stderr[-3000:])
                ranks = json.loads(line.removeprefix("RESULT "))
                print(
                    f"    {how:<17} "
                    + ", ".join(f"rank {r['rank']} {r['peak_growth_mib']} MiB" for r in ranks)
                    + f" (each keeps a {ranks[0]['shard_mib']} MiB shard)"
                )


if __name__ == "__main__":
    if len(sys.argv) == 3:
        launched(sys.argv[1], sys.argv[2])
    else:
        main()

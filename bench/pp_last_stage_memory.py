"""Peak extra memory of the last pipeline stage: the model's own head-and-loss (dense / fused / sparse)
against the path pipeline parallelism used before issue 11 (full logits + plain CE on the last stage).

Configuration: pipeline_parallel_degree 2 of a 2-layer model (the last stage holds layer 1, the
final norm and the LM head), hidden 1024, vocab 103424, one row of 4096 tokens, fp32, 25% of the
labels ignored (prompt tokens). One forward + backward of the last stage on the hidden state the
first stage would send. Weight gradients already exist (a step after the first one, as under
gradient accumulation), so "extra" is what the forward and backward themselves add on top of the
weights, gradients and the input: activations, logits and the loss's temporaries.

    python bench/pp_last_stage_memory.py            # full size (the dense path needs ~6 GiB)
    python bench/pp_last_stage_memory.py --quick    # seq 512, vocab 32000

The stage is built by `split_model` exactly as the trainer does (pipeline rank 1 of 2). The script
also runs on a checkout from before issue 11, where the last stage was `PipelineChunk` + `pipeline_loss`
(which ignored the fused/sparse head flags); run it there first to record the old path:

    PYTHONPATH=<old checkout> python bench/pp_last_stage_memory.py --label before
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness  # noqa: E402

import ernie_core  # noqa: E402
from ernie_core.models import Ernie4_5Config, Ernie4_5ForCausalLM  # noqa: E402
from ernie_core.parallel import pipeline  # noqa: E402

# no_head: the stage's layer and final norm only, backward from a given gradient: the memory any head
# adds comes on top of this.
VARIANTS = {"no_head": {}, "dense": {}, "fused": {"use_fused_head_and_loss_fn": True},
            "sparse_fused": {"use_fused_head_and_loss_fn": True, "use_sparse_head_and_loss_fn": True}}


def build_stage(H: int, V: int, variant: str):
    cfg = Ernie4_5Config(hidden_size=H, intermediate_size=2 * H, num_hidden_layers=2, num_attention_heads=8,
                         num_key_value_heads=8, head_dim=H // 8, vocab_size=V, tie_word_embeddings=False)
    torch.manual_seed(0)
    full = Ernie4_5ForCausalLM(cfg, **VARIANTS[variant])
    pmodel = pipeline.split_model(full, 1, 2, [(0, 1), (1, 2)])  # pipeline rank 1 of 2: the last stage
    return pmodel, pmodel.chunks[0]


def make_step(H: int, V: int, S: int, variant: str):
    pmodel, stage = build_stage(H, V, variant)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(1, S, H, generator=g).requires_grad_()
    pos = torch.arange(S).unsqueeze(0)
    labels = torch.randint(0, V, (1, S), generator=g)
    labels[:, : S // 4] = -100
    old_api = hasattr(pipeline, "pipeline_loss")  # before issue 11: logits from the chunk, CE outside
    grad = torch.ones(1, S, H)

    def step():
        if variant == "no_head":
            stage.model(hidden, pos).backward(grad)
            hidden.grad = None
            return 0.0
        if old_api:
            loss = pipeline.pipeline_loss(stage(hidden, pos), labels)
        else:
            loss = stage(hidden, pos, labels=labels).loss
        loss.backward()
        hidden.grad = None
        return float(loss.detach())

    return step


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--label", default=None, help="'before' when run on a checkout from before issue 11")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args(argv)
    H, V, S = (256, 32000, 512) if args.quick else (1024, 103424, 4096)
    label = args.label or ("before" if hasattr(pipeline, "pipeline_loss") else "after")
    rows = []
    for variant in args.variants.split(","):
        step = make_step(H, V, S, variant)
        loss = step()  # warm-up: allocates the weight gradients a real step accumulates into
        peaks, times = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            peaks.append(_harness.measure_peak_cpu_memory(step))
            times.append(time.perf_counter() - t0)
        rows.append({"code": label, "variant": variant, "seq": S, "hidden": H, "vocab": V, "loss": loss,
                     "extra_peak_mib": min(peaks), "extra_peak_mib_max": max(peaks), "step_s": min(times)})
        del step
    name = "pp_last_stage_memory" + ("-quick" if args.quick else "") + f"-{label}"
    load = os.getloadavg()
    _harness.write_results(name, rows, extra={"load_avg_1_5_15": load, "cores": os.cpu_count(),
                                               "note": "shared 2-core box, other jobs running",
                                               "ernie_core": os.path.dirname(ernie_core.__file__)})


if __name__ == "__main__":
    main()

"""Training-step throughput and peak memory on CPU, and GradCache's memory against the batch size.

Every configuration runs in a fresh subprocess, so its peak memory is its own: the child reports
its peak resident set (``VmHWM`` in ``/proc/self/status``), which includes the Python interpreter,
torch, the model, AdamW's state and the input batch (``base`` is the resident set just before
the first step, after all of that is built).

Each clipforge step is its real training step, ``clipforge.training.loop._step``: the model and
loss wrapped in ``Objective(create_model(name), "clip")``, AdamW from ``build_optimizer`` with the
paper's parameter groups, gradient clipping at 1.0, a ``TrainConfig`` giving the precision
(fp32, or bf16 autocast) and ``micro_batch`` (GradCache, whose full-batch loss step uses the
chunked CLIP loss ``clip_loss_chunked``).  Inputs are random: normal pixels at the model's image
size and captions of 1-8 random words from a small vocabulary (so the text tower runs on short
sequences, as on real captions).  Throughput is the median over the timed steps after the
warm-up steps; seconds are wall time per step.

The peer is Hugging Face ``transformers.CLIPModel`` with the same initial weights (clipforge's
model saved in Hugging Face's layout and loaded by transformers), the same inputs (ids padded
to the longest caption with an attention mask, as ``CLIPTokenizer(padding="longest")`` gives
them), its own loss (``return_loss=True``: the same symmetric cross-entropy), and the same AdamW
groups, gradient clipping and autocast.  It has no ResNet image tower, so small-rn runs alone.

(a) throughput and peak memory: tiny-vit, small-rn and small-vit at batch 128, ViT-B-32 at
    batch 16, in fp32 and bf16 autocast, clipforge next to transformers;
(b) GradCache memory curve: tiny-vit, micro-batch 256, global batch 256 to 32,768, next to the
    plain full-batch step (no GradCache) measured in the same run, for as long as the plain
    step's estimated peak (linear in the batch from the previous point, plus six float32
    N x N matrices for the loss) stays under ``--plain-limit-gib``.  At batch 256 the two are
    the same step: ``_step`` uses GradCache only when the micro-batch is smaller than the batch.

    python benchmarks/bench_train.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_embed import hf_inputs
from clipforge.configs import get_config
from machine import cpu_name, machine_busy_s, status_bytes
from report import write_json

GIB = 1024**3
WORDS = ["red", "blue", "green", "circle", "star", "square", "small", "large", "two", "three",
         "on", "a", "striped", "dotted", "background", "left", "right", "of", "the", "above"]


# ---------------------------------------------------------------------------- child process
def run_child(spec: dict) -> dict:
    """One configuration: build, warm up, time ``spec['steps']`` training steps."""
    import torch

    import clipforge
    from clipforge.training.loop import TrainConfig, _autocast, _step, train_mode
    from clipforge.training.objective import Objective
    from clipforge.training.optim import build_optimizer

    torch.manual_seed(0)
    model = clipforge.create_model(spec["model"])
    objective = Objective(model, "clip")
    objective.init_temperature()
    peer = spec.get("impl", "clipforge") == "transformers"
    if peer:
        objective = _transformers_model(model)
    with tempfile.TemporaryDirectory() as output:
        config = TrainConfig(output=Path(output), model=spec["model"],
                             batch_size=spec["batch"], micro_batch=spec["micro_batch"],
                             precision=spec["precision"], lr=1e-4, grad_clip=1.0)
    train_mode(model, config)
    trainable = [p for p in objective.parameters() if p.requires_grad]
    optimizer = build_optimizer(objective, config.lr, config.decay())
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    autocast = _autocast(config, torch.device("cpu"))

    g = torch.Generator().manual_seed(1)
    n, size = spec["batch"], model.config.image_size
    captions = [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (int(k),),
                                                              generator=g))
                for k in torch.randint(1, 9, (512,), generator=g)]
    pool = clipforge.tokenize(captions)
    tokens = pool[torch.randint(0, len(pool), (n,), generator=g)]
    pixels = torch.randn(n, 3, size, size, generator=g)

    if peer:
        ids, mask = hf_inputs(tokens, clipforge.get_tokenizer().eot_token_id, True)

        def step() -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                loss = objective(input_ids=ids, pixel_values=pixels, attention_mask=mask,
                                 return_loss=True).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
            optimizer.step()
            return loss.detach()
    else:
        def step() -> torch.Tensor:
            return _step(config, objective, None, pixels, tokens, autocast, scaler, optimizer,
                         trainable)

    base = status_bytes("VmRSS")
    for _ in range(spec["warmup"]):
        step()
    seconds, losses = [], []
    for _ in range(spec["steps"]):
        start = time.perf_counter()
        loss = step()
        seconds.append(time.perf_counter() - start)
        losses.append(float(loss))
    return {**spec, "base_bytes": base, "peak_bytes": status_bytes("VmHWM"),
            "seconds": seconds, "median_s": statistics.median(seconds),
            "samples_per_s": n / statistics.median(seconds), "losses": losses,
            "threads": torch.get_num_threads()}


def _transformers_model(model):
    """transformers.CLIPModel holding ``model``'s weights (through clipforge's HF export)."""
    import transformers

    import clipforge

    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        clipforge.save_model(model, Path(tmp) / "hf", format="hf")
        return transformers.CLIPModel.from_pretrained(Path(tmp) / "hf")


# --------------------------------------------------------------------------- parent process
def measure(spec: dict, timeout: float) -> dict:
    """Run one configuration in a fresh interpreter.  ``others``: CPU cores used on average by
    processes other than the child while it ran (a disturbance above ~0.1 on 2 cores)."""
    busy0, own0, wall0 = machine_busy_s(), os.times(), time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                          capture_output=True, text=True, timeout=timeout)
    busy1, own1, wall1 = machine_busy_s(), os.times(), time.perf_counter()
    if done.returncode != 0:
        raise RuntimeError(f"{spec} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if busy0 is not None and busy1 is not None:
        own = sum(own1[:4]) - sum(own0[:4])  # this process and its waited-for children
        result["others_cores"] = max(busy1 - busy0 - own, 0.0) / (wall1 - wall0)
    result["wall_s"] = wall1 - wall0
    return result


def spec(model: str, batch: int, precision: str = "fp32", micro_batch: int | None = None,
         warmup: int = 1, steps: int = 3, impl: str = "clipforge") -> dict:
    return {"model": model, "batch": batch, "precision": precision, "micro_batch": micro_batch,
            "warmup": warmup, "steps": steps, "impl": impl}


def gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def fmt_others(result: dict) -> str:
    cores = result.get("others_cores")
    return "n/a" if cores is None else f"{cores:.2f}"


def throughput_table(results: list[dict]) -> str:
    lines = [f"{'model':<10} {'batch':>5} {'precision':<9} {'impl':<12} {'steps':>5} "
             f"{'samples/s':>9} {'s/step':>7} {'base GiB':>8} {'peak GiB':>8} {'others':>6}"]
    for r in results:
        lines.append(f"{r['model']:<10} {r['batch']:>5} {r['precision']:<9} "
                     f"{r.get('impl', 'clipforge'):<12} {r['steps']:>5} "
                     f"{r['samples_per_s']:>9.1f} {r['median_s']:>7.3f} "
                     f"{gib(r['base_bytes']):>8} {gib(r['peak_bytes']):>8} {fmt_others(r):>6}")
    return "\n".join(lines)


def curve_table(rows: list[tuple[int, dict | None, dict | str | None]]) -> str:
    lines = [f"{'batch':>6} | {'GradCache (micro 256)':^31} | {'plain full-batch step':^31}",
             f"{'':>6} | {'s/step':>8} {'peak GiB':>8} {'others':>6} {'steps':>5} | "
             f"{'s/step':>8} {'peak GiB':>8} {'others':>6} {'steps':>5}"]

    def cells(r: dict | str | None) -> str:
        if r is None:
            return f"{'not run':>31}"
        if isinstance(r, str):
            return f"{r:>31}"
        return (f"{r['median_s']:>8.2f} {gib(r['peak_bytes']):>8} {fmt_others(r):>6} "
                f"{r['steps']:>5}")

    for batch, cached, plain in rows:
        lines.append(f"{batch:>6} | {cells(cached)} | {cells(plain)}")
    return "\n".join(lines)


def environment() -> dict:
    import torch

    import clipforge

    return {"python": platform.python_version(), "torch": torch.__version__,
            "clipforge": clipforge.__version__, "cpu": cpu_name(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "memory_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a few seconds: tiny-vit only, batches up to 1024")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--plain-limit-gib", type=float, default=12.0,
                        help="skip plain full-batch steps whose extrapolated peak exceeds this")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds allowed per configuration")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(run_child(json.loads(args.child))))
        return 0

    env = environment()
    print(f"torch {env['torch']}, clipforge {env['clipforge']}, python {env['python']}; "
          f"{env['cpu']}, {env['cpu_count']} cores, {env['torch_threads']} torch threads, "
          f"{env['memory_gib']:.0f} GiB")
    started = time.perf_counter()

    # (a) throughput and peak memory of the training step
    models = [("tiny-vit", 128, 2, 5)] if args.quick else [
        ("tiny-vit", 128, 2, 5), ("small-rn", 128, 2, 5), ("small-vit", 128, 2, 5),
        ("ViT-B-32", 16, 1, 3)]
    throughput = []
    for model, batch, warmup, steps in models:
        impls = ["clipforge"]
        if get_config(model).vision.is_vit:
            impls.append("transformers")
        for precision in ("fp32", "bf16"):
            for impl in impls:
                result = measure(spec(model, batch, precision, warmup=warmup, steps=steps,
                                      impl=impl), args.timeout)
                throughput.append(result)
                print(f"  {model} {precision} {impl}: {result['samples_per_s']:.1f} samples/s",
                      flush=True)
    print("\n(a) training step (fp32 / bf16 autocast), random inputs, clipforge and "
          "transformers.CLIPModel on the same weights and inputs\n")
    print(throughput_table(throughput))

    # (b) GradCache (chunked CLIP loss) against the plain full-batch step, tiny-vit, fp32
    batches = [256, 1024] if args.quick else [256, 1024, 4096, 16384, 32768]
    rows: list[tuple[int, dict | None, dict | str | None]] = []
    previous_plain: dict | None = None
    for batch in batches:
        steps = 3 if batch <= 1024 else (2 if batch <= 4096 else 1)
        cached = measure(spec("tiny-vit", batch, micro_batch=256, steps=steps,
                              warmup=1 if batch <= 4096 else 0), args.timeout)
        print(f"  GradCache {batch}: {cached['median_s']:.2f} s/step, "
              f"{gib(cached['peak_bytes'])} GiB", flush=True)
        plain: dict | str | None
        estimate = None
        if previous_plain is not None:
            grown = previous_plain["peak_bytes"] - previous_plain["base_bytes"]
            # linear part from the previous point, plus ~6 float32 N x N matrices (the two
            # logits, their log-softmax and gradients) that clip_loss holds at this batch
            estimate = (previous_plain["base_bytes"] + grown * batch / previous_plain["batch"]
                        + 6 * 4 * batch**2)
        if estimate is not None and estimate > args.plain_limit_gib * GIB:
            plain = f"skipped (estimate {estimate / GIB:.1f} GiB)"
        else:
            plain = previous_plain = measure(spec("tiny-vit", batch, steps=steps,
                                                  warmup=1 if batch <= 4096 else 0),
                                             args.timeout)
            print(f"  plain {batch}: {plain['median_s']:.2f} s/step, "
                  f"{gib(plain['peak_bytes'])} GiB", flush=True)
        rows.append((batch, cached, plain))
    print("\n(b) tiny-vit, fp32: GradCache with micro-batch 256 (chunked CLIP loss) against the"
          " plain full-batch step\n")
    print(curve_table(rows))
    print(f"\npeak GiB = peak resident set of a fresh process per row (VmHWM), including "
          f"interpreter, torch, model, optimiser state and inputs; base GiB = resident set "
          f"before the first step; others = average CPU cores used by other processes; "
          f"total {time.perf_counter() - started:.0f} s")

    if args.json is not None:
        write_json(args.json, {"environment": env, "throughput": throughput,
                               "gradcache_curve": [{"batch": b, "gradcache": c, "plain": p}
                                                   for b, c, p in rows]})
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What a finished run reports: zero-shot accuracy on seen and held-out compositions of the
built-in dataset, image<->text retrieval, a printed table, ``eval.json`` and the loss curve."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..data import synthetic
from ..evaluation import ZeroShotClassifier, accuracy_at_k, retrieval_recall
from ..fileio import atomic_file
from ..inference import embed_texts
from ..model import CLIP


@torch.inference_mode()
def _embed_pil(model: CLIP, images: list, batch_size: int = 128) -> torch.Tensor:
    out = []
    for start in range(0, len(images), batch_size):
        pixels = torch.stack([model.preprocess(im) for im in images[start:start + batch_size]])
        out.append(model.encode_image(pixels.to(model.device)).float().cpu())
    return torch.cat(out)


def evaluate_builtin(model: CLIP, seed: int, n: int = 960) -> dict[str, float]:
    """Zero-shot top-1 among all colour-shape classes (chance 1/48) for compositions seen in
    training and for held-out ones, and retrieval recall@1/5 on new captioned scenes.

    For held-out compositions it also reports how often the predicted class has the right
    colour and the right shape: a model that reads only colours gets the first right and the
    second at chance (1/6), which a top-5 figure hides.
    """
    size = model.config.image_size
    classifier = ZeroShotClassifier.build(model, synthetic.CLASSNAMES, synthetic.TEMPLATES)
    result: dict[str, float] = {"chance": 1 / len(synthetic.CLASSNAMES)}
    for split, name in (("seen_eval", "seen"), ("heldout", "heldout")):
        images, labels = synthetic.zero_shot_set(split, n, seed=seed, image_size=size)
        logits = classifier.logits(_embed_pil(model, images))
        accuracy = accuracy_at_k(logits, torch.tensor(labels), ks=(1, 5))
        result[f"{name}_top1"], result[f"{name}_top5"] = accuracy["acc1"], accuracy["acc5"]
    predicted = logits.argmax(dim=-1)  # held-out compositions
    shapes = len(synthetic.SHAPES)  # CLASSNAMES is colour-major
    truth = torch.tensor(labels)
    result["heldout_colour"] = (predicted // shapes == truth // shapes).float().mean().item()
    result["heldout_shape"] = (predicted % shapes == truth % shapes).float().mean().item()
    images, captions = synthetic.retrieval_set(min(n, 1000), seed=seed, image_size=size)
    text = torch.from_numpy(embed_texts(model, captions, truncate=True, progress=False).vectors)
    recall = retrieval_recall(_embed_pil(model, images), text, list(range(len(captions))),
                              ks=(1, 5))
    result.update(recall)
    return result


def plot_loss(metrics_path: Path, destination: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("contrastive loss")
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    twin.plot([r["step"] for r in rows], [r["temperature"] for r in rows], color="tab:orange",
              lw=0.8, alpha=0.7)
    twin.set_ylabel("temperature exp(t)", color="tab:orange")
    fig.tight_layout()
    with atomic_file(destination) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def format_table(result: dict[str, float]) -> str:
    rows = [("zero-shot top-1, seen compositions", result.get("seen_top1")),
            ("zero-shot top-1, held-out compositions", result.get("heldout_top1")),
            ("zero-shot top-5, held-out compositions", result.get("heldout_top5")),
            ("held-out: predicted colour right", result.get("heldout_colour")),
            ("held-out: predicted shape right (chance 16.7%)", result.get("heldout_shape")),
            ("chance (1 of 48 colour-shape classes)", result.get("chance")),
            ("image -> text recall@1", result.get("text_retrieval_recall@1")),
            ("image -> text recall@5", result.get("text_retrieval_recall@5")),
            ("text -> image recall@1", result.get("image_retrieval_recall@1")),
            ("text -> image recall@5", result.get("image_retrieval_recall@5"))]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name.ljust(width)}  {value:6.1%}" for name, value in rows
                     if value is not None)


def final_report(config, model: CLIP, output: Path, skipped: dict[str, int]) -> dict[str, Any]:
    plot_loss(output / "metrics.jsonl", output / "loss.png")
    report: dict[str, Any] = {"steps": config.steps, "skipped": skipped}
    if config.data == "builtin":
        report["eval"] = evaluate_builtin(model, config.seed)
        print("\nzero-shot evaluation on the built-in dataset:")
        print(format_table(report["eval"]))
    else:
        print("\n(no built-in evaluation for your own data: use `clipforge eval` on a held-out "
              "set)")
    with atomic_file(output / "eval.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nmodel, checkpoints, metrics.jsonl, loss.png and eval.json are in {output}")
    print(f"load it with clipforge.load({str(output)!r}) or `--model {output}`")
    return report

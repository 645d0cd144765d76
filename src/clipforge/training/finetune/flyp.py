"""``--method flyp``: "Finetune like you pretrain" (Goyal et al., CVPR 2023).

Each training image is paired with a prompt of its class (one of the templates, drawn per image
from the run's seed) and both towers are trained with the pretraining loss itself, CLIP's
contrastive loss over the batch (:func:`clipforge.loss.clip_loss`; a sigmoid-loss model such as
SigLIP, its own loss, :func:`~clipforge.loss.sigmoid_loss`, with its logit bias), temperature
included.  The
classifier is never trained as a head: it is the zero-shot head of the fine-tuned towers,
rebuilt from all the templates (prompt ensembling).  The paper finds this beats cross-entropy
fine-tuning in and out of distribution; WiSE-FT then mixes both towers and the temperature, and
the mix's head is rebuilt from its text tower.

As in the paper's code, two images of one class in a batch are each other's negatives' prompts
too (their prompts differ only by template); the loss does not special-case them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ...classifier import LinearClassifier
from ...evaluation.zeroshot import Templates, ZeroShotClassifier, class_prompts
from ...loss import LOGIT_SCALE_MAX, clip_loss, sigmoid_loss
from ...model import CLIP


class Flyp(nn.Module):
    """The model trained contrastively against its class prompts (both towers, unless the
    run freezes one)."""

    def __init__(self, model: CLIP, classnames: Sequence[str], templates: Templates, seed: int):
        super().__init__()
        self.model = model
        self.classnames = list(classnames)
        self.templates = templates
        # per class, its prompts' token ids [templates, context] (truncated as zero-shot does)
        self.tokens = [model.tokenizer([prompt for _, prompt in pairs], truncate=True)
                       for pairs in class_prompts(classnames, templates)]
        self.generator = torch.Generator().manual_seed(seed)
        # the paper's bound on the temperature, as pretraining keeps it (a pretrained SigLIP's
        # may lie above it: it is kept where it is, not cut down at the first step)
        self.scale_max = max(LOGIT_SCALE_MAX, model.logit_scale.item())

    def get_extra_state(self) -> dict[str, torch.Tensor]:
        """The prompt sampler's state travels in ``state_dict`` (a resumed run draws on)."""
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])

    def captions(self, targets: torch.Tensor) -> torch.Tensor:
        """A prompt of each image's class, its template drawn from the run's random stream."""
        rows = []
        for target in targets.tolist():
            choices = self.tokens[target]
            rows.append(choices[torch.randint(len(choices), (), generator=self.generator)])
        return torch.stack(rows).to(self.model.device)

    def loss(self, pixels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, self.scale_max)
        image = self.model.encode_image(pixels, normalize=True).float()
        text = self.model.encode_text(self.captions(targets), normalize=True).float()
        scale, bias = self.model.logit_scale.float(), self.model.logit_bias
        if bias is None:
            return clip_loss(image, text, scale)
        return sigmoid_loss(image, text, scale, bias.float())  # a SigLIP model's own loss

    def classifier(self, like: LinearClassifier) -> LinearClassifier:
        """The zero-shot head of the model as it is now (``like``'s class names and info)."""
        return head_of(self.model, self.classnames, self.templates, like)


def head_of(model: CLIP, classnames: Sequence[str], templates: Templates,
            like: LinearClassifier) -> LinearClassifier:
    """The zero-shot head of ``model``'s current towers, with ``like``'s info."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        zeroshot = ZeroShotClassifier.build(model, classnames, templates)
    model.train(was_training)
    return LinearClassifier.from_zeroshot(zeroshot, like.info)

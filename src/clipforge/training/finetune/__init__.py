"""``clipforge finetune``: adapt a CLIP model to your own labelled images without losing its
robustness (zero-shot-head initialisation, end-to-end or linear training, WiSE-FT).

* :mod:`.config`: what a run is asked (:class:`FinetuneConfig`) and the methods' defaults;
* :mod:`.data`: the labelled sets (the evaluation readers), the held-out split, class checks;
* :mod:`.wise_ft`: the weight-space mixes and the model files a run writes;
* :mod:`.loop`: the run itself (:func:`finetune`).

The package imports only :mod:`.config` (torch-free), so that building the command line does
not load the training code; import :func:`.loop.finetune` from :mod:`.loop`.
"""

from .config import METHODS, FinetuneConfig, parse_alphas

__all__ = ["METHODS", "FinetuneConfig", "parse_alphas"]

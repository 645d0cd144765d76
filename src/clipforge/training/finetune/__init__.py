"""``clipforge finetune``: adapt a CLIP model to your own labelled images without losing its
robustness (zero-shot-head initialisation, end-to-end or linear training, WiSE-FT).

* :mod:`.config`: what a run is asked (:class:`FinetuneConfig`) and the methods' defaults;
* :mod:`.data`: the labelled sets (the evaluation readers), the held-out split, class checks;
* :mod:`.wise_ft`: the weight-space mixes and the model files a run writes;
* :mod:`.loop`: the run itself (:func:`finetune`).
"""

from .config import METHODS, FinetuneConfig, parse_alphas
from .loop import finetune

__all__ = ["METHODS", "FinetuneConfig", "finetune", "parse_alphas"]

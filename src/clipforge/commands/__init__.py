"""The ``clipforge`` commands, one module per command or group, each holding its parser and its
handler side by side: ``register(sub)`` adds the command's parser to the top-level subparsers
with the handler as its ``handler`` default.  :mod:`clipforge.cli` only assembles them (in the order
``clipforge --help`` lists them) and runs one.

Handlers call the library (:func:`clipforge.create_model` through
:func:`~clipforge.commands.options.load_model`, :mod:`clipforge.inference`,
:class:`~clipforge.evaluation.zeroshot.ZeroShotClassifier`, :mod:`clipforge.search`...) and
re-implement none of it; what they add is reading options and printing results.
"""

from __future__ import annotations

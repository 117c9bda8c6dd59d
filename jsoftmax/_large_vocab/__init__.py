"""Linear cross-entropy and softmax statistics for large vocabularies, without the logits.

``linear_cross_entropy(hidden, weight, labels)`` equals
``cross_entropy(hidden @ weight + bias, labels)`` but never holds the ``(N, V)``
logits, their softmax or their gradient: the vocabulary is scanned in chunks and only
per-token statistics are kept. The package is split by concern:

* ``_tiles.py``: the static configuration and one tile's logits and gradients, the chunk
  loop, the online-logsumexp rescaling;
* ``_core.py``: the forward sweep (every per-token statistic in one pass) and its
  ``custom_vjp`` backward sweep;
* ``_filter.py``: gradient filtering of the backward sweep (``filter_eps``);
* ``_sharding.py``: vocabulary parallelism (shard offsets, collectives, varying axes);
* ``_softmax_stats.py``: the :class:`SoftmaxStats` a caller receives;
* ``_api.py``: the public functions, their argument checks and the vocabulary order.

``jsoftmax/_distill.py`` reuses the tiles, the sweep and the checks for two heads.
"""

from jsoftmax._large_vocab._api import linear_cross_entropy as linear_cross_entropy
from jsoftmax._large_vocab._api import linear_softmax_stats as linear_softmax_stats
from jsoftmax._large_vocab._api import vocab_order_from_counts as vocab_order_from_counts
from jsoftmax._large_vocab._softmax_stats import SoftmaxStats as SoftmaxStats

"""jsoftmax: numerically stable softmax, log-softmax, logsumexp and cross-entropy for JAX.

Every function here is pure and works under ``jax.jit``, ``jax.vmap`` and ``jax.grad``.
See ``README.md`` for a tour and the documentation under ``docs/`` for the user guide and
the API reference.
"""

__version__ = "0.2.0"

# --- softmax family (jsoftmax/_softmax.py)
from jsoftmax._softmax import hardmax as hardmax
from jsoftmax._softmax import log_softmax as log_softmax
from jsoftmax._softmax import logsumexp as logsumexp
from jsoftmax._softmax import softmax as softmax
from jsoftmax._softmax import softmax2d as softmax2d

# --- losses (jsoftmax/_losses.py, jsoftmax/_checks.py)
from jsoftmax._checks import checked as checked
from jsoftmax._losses import binary_cross_entropy_with_logits as binary_cross_entropy_with_logits
from jsoftmax._losses import class_weights as class_weights
from jsoftmax._losses import cross_entropy as cross_entropy
from jsoftmax._losses import focal_loss as focal_loss
from jsoftmax._losses import logit_adjust as logit_adjust
from jsoftmax._losses import loss_denominator as loss_denominator
from jsoftmax._losses import nll_loss as nll_loss
# --- end losses

# --- large vocabularies (jsoftmax/_large_vocab/)
from jsoftmax._large_vocab import SoftmaxStats as SoftmaxStats
from jsoftmax._large_vocab import linear_cross_entropy as linear_cross_entropy
from jsoftmax._large_vocab import linear_softmax_stats as linear_softmax_stats
from jsoftmax._large_vocab import vocab_order_from_counts as vocab_order_from_counts
# --- end large vocabularies

# --- distillation (jsoftmax/_distill.py)
from jsoftmax._distill import jsd as jsd
from jsoftmax._distill import kl_divergence as kl_divergence
from jsoftmax._distill import linear_jsd as linear_jsd
from jsoftmax._distill import linear_kl_divergence as linear_kl_divergence
from jsoftmax._distill import linear_topk_kl_divergence as linear_topk_kl_divergence
# --- end distillation

# --- post-training (jsoftmax/_post_training.py)
from jsoftmax._post_training import GRPOMetrics as GRPOMetrics
from jsoftmax._post_training import PreferenceMetrics as PreferenceMetrics
from jsoftmax._post_training import dpo_loss as dpo_loss
from jsoftmax._post_training import grpo_loss as grpo_loss
from jsoftmax._post_training import linear_token_logprobs as linear_token_logprobs
from jsoftmax._post_training import orpo_loss as orpo_loss
from jsoftmax._post_training import sequence_logprobs as sequence_logprobs
from jsoftmax._post_training import simpo_loss as simpo_loss
# --- end post-training

# --- calibration and open-set recognition (jsoftmax/_calibration.py)
from jsoftmax._calibration import energy_score as energy_score
from jsoftmax._calibration import expected_calibration_error as expected_calibration_error
from jsoftmax._calibration import fit_temperature as fit_temperature
from jsoftmax._calibration import max_softmax_probability as max_softmax_probability
from jsoftmax._calibration import predict_with_rejection as predict_with_rejection
from jsoftmax._calibration import reliability_diagram as reliability_diagram
# --- end calibration

# --- optax drop-ins: `jsoftmax.optax` (jsoftmax/optax.py)
from jsoftmax import optax as optax
# --- end optax

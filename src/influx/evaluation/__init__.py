r"""Does an influence score predict what retraining does? Retraining-based evaluation.

Influence functions compute a defined quantity; whether it predicts the effect of removing
training data on *your* model is an empirical question, answered by retraining:

* [retrain_on_subsets][influx.evaluation.retrain_on_subsets] retrains on random subsets
  (seeded, several training seeds, on a Dask client, resumable from a zarr store) and
  [lds][influx.evaluation.lds] scores any matrix of influence scores against it: the linear
  datamodeling score, the mean over test points of the Spearman correlation between the
  measured test losses and the additive predictions $-\sum_{j \in S_m} I_{ij}$;
* [leave_one_out][influx.evaluation.leave_one_out] and
  [counterfactual_removal][influx.evaluation.counterfactual_removal] retrain without single
  points, or without the points the scores call most helpful or harmful;
* [detection_auc][influx.evaluation.detection_auc] measures how well a value detects
  flagged points (e.g. mislabeled ones).

The package works on numbers from any library: it imports neither torch nor
`influx.torch`, and accepts tensors wherever it takes arrays (through `numpy.asarray`). zarr
and dask are imported only when a store or a client is used.

Modules: `influx.evaluation.checks` (input checks), `influx.evaluation.ranks` (ranks with
ties, Spearman, AUC), `influx.evaluation.datamodeling` (the LDS), `influx.evaluation.store` (the zarr record of
retrainings), `influx.evaluation.retraining` and `influx.evaluation.removal`.
"""

from .datamodeling import LdsResult, lds, subset_predictions
from .ranks import average_ranks, detection_auc, spearman_rows
from .removal import (
    CounterfactualResult,
    LeaveOneOutResult,
    counterfactual_removal,
    leave_one_out,
)
from .retraining import RetrainingResult, draw_subsets, retrain_on_subsets, run_retrainings

__all__ = [
    "CounterfactualResult",
    "LdsResult",
    "LeaveOneOutResult",
    "RetrainingResult",
    "average_ranks",
    "counterfactual_removal",
    "detection_auc",
    "draw_subsets",
    "lds",
    "leave_one_out",
    "retrain_on_subsets",
    "run_retrainings",
    "spearman_rows",
    "subset_predictions",
]

"""The zarr record of a set of retrainings, written as results arrive and read to resume.

A store is a zarr (v3) group holding

* `subsets`: the boolean masks `(M, n_train)` of the retrainings' training points;
* `outputs`: float64 `(n_seeds, M, n_test)`, the measured test losses of each retraining,
  one zarr chunk per retraining (created with the first result, when `n_test` is known);
* `done`: boolean `(n_seeds, M)`, the completion mask, one zarr chunk per retraining. A
  retraining's flag is set only after its outputs are written, so a result half-written
  when the process died is recomputed;
* the attribute `"influx_evaluation"`: the settings that produced the subsets (kind,
  number of training points, seeds, ...), the format version and the library version.

Opening an existing store checks that its settings and subsets are those of the current
call: a store made with other settings is a `ValueError` naming the setting.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Dict, Optional

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:  # pragma: no cover
    import zarr

__all__ = ["ATTRIBUTE_KEY", "FORMAT_VERSION", "RetrainingStore"]

logger = logging.getLogger(__name__)

ATTRIBUTE_KEY = "influx_evaluation"
"""The group attribute holding the settings of the retrainings."""
FORMAT_VERSION = 1
"""The layout version of the store."""


def _library_version() -> str:
    from .. import __version__

    return __version__


class RetrainingStore:
    """A zarr group recording retrainings as they complete.

    Args:
        store: a path, or any store `zarr.open_group` accepts.
        settings: JSON-serialisable settings that identify the computation.
        subsets: the boolean masks `(M, n_train)` of the retrainings.
        n_seeds: the number of training seeds per subset.

    Raises:
        ValueError: if the store holds retrainings made with other settings or subsets, or
            a zarr group that influx did not write.
    """

    def __init__(self, store: Any, settings: Dict[str, Any], subsets: NDArray, n_seeds: int):
        import zarr

        self.location = store
        try:
            self.group = zarr.open_group(store=store, mode="a")
        except zarr.errors.ContainsArrayError:
            raise ValueError(
                f"Parameter 'store': {store!r} holds a zarr array, expected a new path or a "
                "group of retrainings written by influx."
            ) from None
        recorded = self.group.attrs.get(ATTRIBUTE_KEY)
        if recorded is None:
            if len(list(self.group.keys())):
                raise ValueError(
                    f"Parameter 'store': {store!r} holds a zarr group that influx's evaluation "
                    f"did not write (no {ATTRIBUTE_KEY!r} attribute); use a new path."
                )
            self._create(settings, subsets, n_seeds)
        else:
            self._validate(recorded, settings, subsets)
        self.done: NDArray[np.bool_] = np.asarray(self._array("done")[...], dtype=bool)
        if self.done.any():
            logger.info(
                "Resuming from %r: %d of %d retrainings are done.",
                store,
                int(self.done.sum()),
                self.done.size,
            )

    def _create(self, settings: Dict[str, Any], subsets: NDArray, n_seeds: int) -> None:
        n_subsets, n_train = subsets.shape
        self.group.create_array(
            "subsets",
            shape=subsets.shape,
            dtype=bool,
            chunks=(max(1, min(n_subsets, 1024)), max(1, n_train)),
        )
        self._array("subsets")[...] = subsets
        self.group.create_array(
            "done", shape=(n_seeds, n_subsets), dtype=bool, chunks=(1, 1), fill_value=False
        )
        self.group.attrs[ATTRIBUTE_KEY] = {
            **settings,
            "format_version": FORMAT_VERSION,
            "library_version": _library_version(),
        }

    def _validate(self, recorded: Any, settings: Dict[str, Any], subsets: NDArray) -> None:
        if not isinstance(recorded, dict):
            raise ValueError(
                f"Parameter 'store': the {ATTRIBUTE_KEY!r} attribute of {self.location!r} is "
                f"not a record of retrainings, got {recorded!r}."
            )
        for key, value in settings.items():
            if recorded.get(key) != value:
                raise ValueError(
                    f"Parameter 'store': {self.location!r} holds retrainings made with "
                    f"{key}={recorded.get(key)!r}, this call has {key}={value!r}; use another "
                    "store or the same settings."
                )
        stored = np.asarray(self._array("subsets")[...])
        if stored.shape != subsets.shape or not np.array_equal(stored, subsets):
            raise ValueError(
                f"Parameter 'store': {self.location!r} holds other subsets (shape "
                f"{stored.shape}) than this call draws (shape {subsets.shape}) with the same "
                "settings; use another store."
            )

    def _array(self, name: str) -> "zarr.Array":
        import zarr

        array = self.group[name]
        if not isinstance(array, zarr.Array):
            raise ValueError(
                f"Parameter 'store': {name!r} in {self.location!r} is a group, expected an array."
            )
        return array

    @property
    def n_test(self) -> Optional[int]:
        """The number of test points of the stored outputs (None before the first result)."""
        if "outputs" not in self.group:
            return None
        return int(self._array("outputs").shape[2])

    def write(self, seed_index: int, subset_index: int, values: NDArray[np.float64]) -> None:
        """Record the outputs of one retraining, then mark it done."""
        if "outputs" not in self.group:
            n_seeds, n_subsets = self.done.shape
            self.group.create_array(
                "outputs",
                shape=(n_seeds, n_subsets, values.shape[0]),
                dtype=np.float64,
                chunks=(1, 1, max(1, values.shape[0])),
                fill_value=np.nan,
            )
        self._array("outputs")[seed_index, subset_index, :] = values
        self._array("done")[seed_index, subset_index] = True
        self.done[seed_index, subset_index] = True

    def outputs(self) -> NDArray[np.float64]:
        """All stored outputs, `(n_seeds, M, n_test)` (NaN where not done)."""
        return np.asarray(self._array("outputs")[...], dtype=np.float64)

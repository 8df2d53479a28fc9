"""``InputConformance``: bad input is refused with imgstore's errors before anything is written (pytest needed).

:class:`~imgstore.testing.StoreConformance` inherits these tests (it defines the fixtures); they
are kept apart so that each module stays readable. ``bad_puts`` lists the calls each layout must
refuse; a backend's class may extend it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from imgstore import open_store
from imgstore.errors import ImgStoreError, InvalidImageError, InvalidLabelError, InvalidOptionError
from imgstore.manifest import MANIFEST_NAME
from imgstore.testing.checks import BackendTest, check_records
from imgstore.testing.encoded_conformance import Filled
from imgstore.testing.layouts import Records


class InputConformance(BackendTest):
    """The tests of :class:`~imgstore.testing.StoreConformance` on bad input."""

    def bad_puts(self, records: Records) -> list[tuple[Any, Any, type[ImgStoreError]]]:
        """(images or files, labels, the error) of put calls this layout's store must refuse before writing."""
        items, labels = records.items, records.labels
        bad_labels: list[tuple[Any, Any, type[ImgStoreError]]] = [
            (items[:2], labels[:3], InvalidLabelError),
            (items[:2], [1, -1], InvalidLabelError),
            (items[:2], [1, 2**64], InvalidLabelError),
            (items[:2], [1.0, 2.0], InvalidLabelError),
            (items[:2], [True, False], InvalidLabelError),
            (items[:2], np.array([[1, 2]]), InvalidLabelError),
        ]
        if records.blobs is not None:
            return bad_labels  # bad files: test_put_encoded_many_checks_each_header
        arrays = records.arrays
        assert arrays is not None
        if not self.layout.encoded:
            assert isinstance(arrays, np.ndarray)
            return [
                (arrays[:2].astype(np.float32), labels[:2], InvalidImageError),
                (arrays[:2].astype(bool), labels[:2], InvalidImageError),
                (arrays[:2].astype(np.int16), labels[:2], InvalidImageError),
                (arrays[:2, :16], labels[:2], InvalidImageError),
                (arrays[:2].transpose(0, 3, 1, 2), labels[:2], InvalidImageError),  # CHW given to an HWC store
                (arrays[0], labels[:1], InvalidImageError),  # one image where a batch is expected
                *bad_labels,
            ]
        first = arrays[0]
        bad: list[tuple[Any, Any, type[ImgStoreError]]] = [
            ([first.astype(np.float32)], labels[:1], InvalidImageError),
            ([first, first.astype(bool)], labels[:2], InvalidImageError),
            ([first.astype(np.int16)], labels[:1], InvalidImageError),
            ([np.zeros((0, 5, 3), np.uint8)], labels[:1], InvalidImageError),  # an empty image
            ([np.zeros((2, 2, 2, 2), np.uint8)], labels[:1], InvalidImageError),  # 3-D: not an image
            ([np.zeros(7, np.uint8)], labels[:1], InvalidImageError),
            (first[:, :, 0] if first.ndim == 3 else first[:, 0], labels[:1], InvalidImageError),  # not a batch
        ]
        unencodable = {"png": 5, "jpeg": 4, "webp": 1}.get(self.codec)  # a channel count the codec cannot encode
        if unencodable is not None:
            bad.append(([first, np.zeros((4, 4, unencodable), np.uint8)], labels[:2], InvalidImageError))
        if not self.layout.varied:  # one shape: any other is refused
            assert isinstance(arrays, np.ndarray)
            bad += [
                (arrays[:2, :16], labels[:2], InvalidImageError),
                (arrays[:2].transpose(0, 3, 1, 2), labels[:2], InvalidImageError),
                (arrays[0], [1] * len(arrays[0]), InvalidImageError),  # one image where a batch is expected
            ]
        return [*bad, *bad_labels]

    def test_invalid_input_raises_and_writes_nothing(self, filled: Filled) -> None:
        path, records = filled
        with open_store(path, mode="a") as store:
            for k, (bad_items, bad_labels, error) in enumerate(self.bad_puts(records)):
                with pytest.raises(error):
                    if records.blobs is not None:
                        store.put_encoded_many(bad_items, bad_labels)
                    else:
                        store.put_many(bad_items, bad_labels)
                assert issubclass(error, ImgStoreError) and issubclass(error, ValueError)
                assert len(store) == len(records), f"bad call {k} stored something"
            with pytest.raises(InvalidLabelError):
                records.put_one(store, 0, -3)
            with pytest.raises(InvalidLabelError):
                records.put_one(store, 0, 2.5)
            with pytest.raises(InvalidImageError):
                store.put(np.zeros((4, 4, 3), np.float64), 1)
            assert len(store) == len(records)
        with open_store(path) as store:
            check_records(store, records)

    def test_unknown_option_is_refused(self, path: Path) -> None:
        with pytest.raises(InvalidOptionError, match="no option"):
            open_store(path, self.backend, "w", not_an_option=1, **self.layout.store_kwargs())
        assert not (path / MANIFEST_NAME).exists()

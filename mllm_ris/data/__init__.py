"""Datasets: one sample type (:class:`RISSample`) for every referring-segmentation source."""

from mllm_ris.data.registry import DATASET_NAMES, build_dataset
from mllm_ris.data.sample import RefEntry, ReferringDataset, RISSample, Sentence

__all__ = ["DATASET_NAMES", "RISSample", "RefEntry", "ReferringDataset", "Sentence", "build_dataset"]

"""Datasets (VOC, COCO, YOLO, generated sample data), their pipelines, and the DataModule that serves batches."""

from lightning_det.data.coco import COCOSource, read_coco
from lightning_det.data.collate import collate_detection
from lightning_det.data.datamodule import DetectionDataModule
from lightning_det.data.dataset import (
    AspectRatioBatchSampler,
    DetectionDataset,
    SortedAspectRatioBatchSampler,
    TrainingSampler,
)
from lightning_det.data.options import LoaderOptions, PipelineOptions, ReadingOptions, SamplerOptions
from lightning_det.data.records import (
    AnnotationRecord,
    Annotations,
    ImageLoadError,
    InvalidAnnotationError,
    read_annotations,
)
from lightning_det.data.sample import SAMPLE_CLASSES, generate_sample_data
from lightning_det.data.voc import VOC_CLASSES, VOCSource, read_voc
from lightning_det.data.yolo_format import YOLODataModule, YOLOSource

__all__ = [
    "AnnotationRecord",
    "AspectRatioBatchSampler",
    "SortedAspectRatioBatchSampler",
    "Annotations",
    "COCOSource",
    "DetectionDataModule",
    "DetectionDataset",
    "ImageLoadError",
    "InvalidAnnotationError",
    "LoaderOptions",
    "PipelineOptions",
    "ReadingOptions",
    "SAMPLE_CLASSES",
    "SamplerOptions",
    "TrainingSampler",
    "VOCSource",
    "VOC_CLASSES",
    "YOLODataModule",
    "YOLOSource",
    "collate_detection",
    "generate_sample_data",
    "read_annotations",
    "read_coco",
    "read_voc",
]

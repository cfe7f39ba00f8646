"""Calibration / evaluation data: conversation files + image folders -> rendered samples."""

from tlq.data.conversations import Record, Sample, build_samples, data_hash, load_records, render_sample

__all__ = ["Record", "Sample", "build_samples", "data_hash", "load_records", "render_sample"]

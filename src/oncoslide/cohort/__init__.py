"""Cohorts: slide tables and their validation, TCGA barcodes, omics tables and patient bags."""

from oncoslide.cohort.bags import PatientBag, empty_slides, load_bag
from oncoslide.cohort.omics import Omics, load_omics
from oncoslide.cohort.table import Cohort, load_cohort
from oncoslide.cohort.tcga import TcgaBarcode, is_tcga_barcode, parse_tcga_barcode

__all__ = [
    "Cohort",
    "Omics",
    "PatientBag",
    "TcgaBarcode",
    "empty_slides",
    "is_tcga_barcode",
    "load_bag",
    "load_cohort",
    "load_omics",
    "parse_tcga_barcode",
]

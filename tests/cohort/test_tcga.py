"""TCGA barcode parsing: patient, tissue source site, sample, slide and aliquot parts."""

from __future__ import annotations

import pytest

from oncoslide.cohort import is_tcga_barcode, parse_tcga_barcode

SLIDE = "TCGA-A2-A0CM-01Z-00-DX1.AC6A2D9D-6A6E-4E3E-9F59-5B8C6B5E1F0A"


def test_diagnostic_slide_barcode() -> None:
    b = parse_tcga_barcode(SLIDE)
    assert b is not None
    assert b.patient_id == "TCGA-A2-A0CM" == SLIDE[:12]
    assert b.site == b.tss == "A2"
    assert b.participant == "A0CM"
    assert (b.sample_type, b.vial, b.portion, b.analyte) == ("01", "Z", "00", None)
    assert (b.slide_type, b.slide_number) == ("DX", "1")
    assert b.suffix == "AC6A2D9D-6A6E-4E3E-9F59-5B8C6B5E1F0A"
    assert b.is_tumor is True


def test_frozen_section_slides_and_normal_samples() -> None:
    top = parse_tcga_barcode("TCGA-05-4244-11A-01-TS1")
    assert top is not None
    assert (top.tss, top.sample_type, top.vial, top.portion) == ("05", "11", "A", "01")
    assert (top.slide_type, top.slide_number) == ("TS", "1")
    assert top.is_tumor is False
    bottom = parse_tcga_barcode("TCGA-05-4244-01A-01-BS1")
    assert bottom is not None and bottom.slide_type == "BS"


def test_aliquot_barcode_has_analyte_plate_and_center() -> None:
    b = parse_tcga_barcode("TCGA-02-0001-01C-01D-0182-01")
    assert b is not None
    assert (b.portion, b.analyte, b.plate, b.center) == ("01", "D", "0182", "01")
    assert b.slide_type is None


def test_patient_level_barcode_and_whitespace() -> None:
    b = parse_tcga_barcode("  TCGA-OL-A66H \n")
    assert b is not None
    assert b.barcode == "TCGA-OL-A66H" and b.patient_id == "TCGA-OL-A66H" and b.site == "OL"
    assert b.sample_type is None and b.is_tumor is None


@pytest.mark.parametrize(
    "text",
    [
        "tcga-a2-a0cm-01z-00-dx1",  # GDC barcodes are upper case
        "TCGA-A2-A0C",  # participant too short
        "TCGA_A2_A0CM",
        "CPTAC-A2-A0CM",
        "TCGA-A2-A0CM-1Z",
        "patient_007",
        "",
        None,
        12,
    ],
)
def test_non_barcodes(text: object) -> None:
    assert parse_tcga_barcode(text) is None
    assert not is_tcga_barcode(text)


def test_is_tcga_barcode_true_for_every_level() -> None:
    for text in (SLIDE, "TCGA-A2-A0CM", "TCGA-A2-A0CM-01A", "TCGA-02-0001-01C-01D-0182-01"):
        assert is_tcga_barcode(text)

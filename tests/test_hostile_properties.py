"""Property (hypothesis): for random trees of file names (same stems, same names in different folders, unicode,
'%', '..', absolute list entries), the planned outputs are one-to-one with the inputs and lie inside --out; a
refusal happens only for a real clash and lists it; nothing is written before the refusal."""
from __future__ import annotations

import os
import shutil
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from samvit.data.sources import collect_inputs, safe_key
from samvit.embeddings.files import output_path, plan_outputs
from samvit.errors import OutputError

FOLDERS = ["a", "b", "é", "日本", "x y", "%2F", ".."[:1] + "x"]
STEMS = ["img", "IMG", "ü", "a.b", "%2E%2E", "..a", "-", "Ω"]
EXTS = [".png", ".jpg", ".PNG", ".jpeg"]

files = st.lists(st.tuples(st.lists(st.sampled_from(FOLDERS), max_size=2), st.sampled_from(STEMS),
                           st.sampled_from(EXTS)), min_size=1, max_size=12)
SETTINGS = settings(max_examples=60, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


def _tree(root: str, spec) -> list:
    made = []
    for folders, stem, ext in spec:
        path = os.path.join(root, "tree", *folders, stem + ext)
        if os.path.exists(path):
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(path.encode())  # distinct bytes per file (not decoded: planning only)
        made.append(path)
    return made


def _check(root: str, inputs: list, expected_files: set) -> None:
    out = os.path.join(root, "out")
    items = collect_inputs(inputs)  # keys are injective by construction: never a clash from these trees
    keys = [k for _, k in items]
    assert len(set(keys)) == len(keys)
    assert {os.path.realpath(p) for p, _ in items} == {os.path.realpath(p) for p in expected_files}
    assert all(not k.startswith("/") and ".." not in k.split("/") for k in keys)
    try:
        done = plan_outputs(out, items, model="m", checkpoint_sha256="x")
    except OutputError as e:  # only for a real clash (same stem, two extensions), listing every file of it
        dests = {}
        for p, k in items:
            dests.setdefault(output_path(out, k), []).append(p)
        clashes = [ps for ps in dests.values() if len(ps) > 1]
        assert clashes, str(e)
        assert all(p in str(e) for ps in clashes[:10] for p in ps)
        assert not os.path.exists(out)  # refused before anything was written
        return
    assert done == {}
    outs = [output_path(out, k) for _, k in items]
    assert len(set(outs)) == len(outs) == len(items)
    real_out = os.path.realpath(out)
    for o in outs:
        assert os.path.commonpath([real_out, os.path.realpath(os.path.dirname(o))]) == real_out
        assert os.path.realpath(o) not in {os.path.realpath(p) for p, _ in items}


@SETTINGS
@given(spec=files)
def test_folder_inputs_map_one_to_one_inside_out(spec):
    root = tempfile.mkdtemp()
    try:
        made = _tree(root, spec)
        _check(root, [os.path.join(root, "tree")], set(made))
    finally:
        shutil.rmtree(root)


@SETTINGS
@given(spec=files, forms=st.lists(st.sampled_from(["relative", "dotdot", "absolute", "dot"]), min_size=12,
                                  max_size=12), crlf=st.booleans(), bom=st.booleans())
def test_list_entries_map_one_to_one_inside_out(spec, forms, crlf, bom):
    root = tempfile.mkdtemp()
    try:
        made = _tree(root, spec)
        lists = os.path.join(root, "tree", "lists")
        os.makedirs(lists, exist_ok=True)
        entries = []
        for path, form in zip(made, forms):
            rel = os.path.relpath(path, os.path.join(root, "tree"))
            entries.append({"relative": os.path.join("..", rel), "dotdot": os.path.join("..", "lists", "..", rel),
                            "absolute": path, "dot": os.path.join(".", "..", rel)}[form])
        nl = "\r\n" if crlf else "\n"
        with open(os.path.join(lists, "l.txt"), "wb") as f:
            f.write((("\ufeff" if bom else "") + nl.join(entries) + nl).encode("utf-8"))
        _check(root, [os.path.join(lists, "l.txt")], set(made))
    finally:
        shutil.rmtree(root)


@settings(max_examples=200, deadline=None, database=None, derandomize=True)
@given(a=st.text(min_size=1, max_size=12), b=st.text(min_size=1, max_size=12))
def test_safe_key_is_injective_and_stays_inside(a, b):
    """Two different normalised paths never share a key; a key never climbs out or starts at the root."""
    import posixpath
    import re

    for p in (a, b):
        k = safe_key(p)
        assert not k.startswith("/") and ".." not in k.split("/")
    na, nb = (re.sub("^/+", "/", posixpath.normpath(p.replace(os.sep, "/"))) for p in (a, b))  # //a is /a
    if "\0" not in a + b and na != nb and na.strip("/") and nb.strip("/") and not {na, nb} & {".", "/", "//"}:
        assert safe_key(a) != safe_key(b)

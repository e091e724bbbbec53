"""Slide ids and local names (issue 12 §6): local file names keep ``#``, ``?``, ``::``, ``[`` and
non-ASCII letters distinct through slide lists and jobs; an existing name with glob characters is
a file, not a pattern; ids that collide are made distinct deterministically and reported."""

from __future__ import annotations

import hashlib
import shutil

import pytest
from conftest import make_embed_slide

from wsi.io import safe_slide_id, unique_slide_ids
from wsi.loader import SlideSpec, resolve_slides

NAMES = ["foo#bar.svs", "foo?x=1.svs", "a::b.svs", "café.svs", "scan[1].svs", "star*.svs"]


@pytest.fixture(scope="module")
def odd_names(tmp_path_factory):
    d = tmp_path_factory.mktemp("names")
    first = make_embed_slide(d / NAMES[0])
    for n in NAMES[1:]:
        shutil.copy(first, d / n)
    shutil.copy(first, d / "scan1.svs")  # what the pattern scan[1].svs would match
    return d


def test_local_names_are_literal_and_distinct(odd_names):
    specs = resolve_slides(odd_names)
    assert sorted(s.url for s in specs) == sorted(str(odd_names / n) for n in [*NAMES, "scan1.svs"])
    assert len({s.slide_id for s in specs}) == len(specs)  # no two collapse to one id
    # a listed name that exists is that file, even with ?, [ or * in it: never expanded as a glob
    for n in ("foo?x=1.svs", "scan[1].svs", "star*.svs"):
        assert [s.url for s in resolve_slides(str(odd_names / n))] == [str(odd_names / n)]
    # what does not exist is a pattern
    assert [s.url for s in resolve_slides(str(odd_names / "scan?.svs"))] == [str(odd_names / "scan1.svs")]


def test_remote_names_with_glob_characters():
    import fsspec

    fs = fsspec.filesystem("memory")
    for name in ("a?b.svs", "axb.svs", "ayb.svs"):
        fs.pipe(f"/globq/{name}", b"x")
    assert [s.url for s in resolve_slides("memory://globq/a?b.svs")] == ["memory://globq/a?b.svs"]
    assert [s.url for s in resolve_slides("memory://globq/a[xy]b.svs")] == [
        "memory:///globq/axb.svs",
        "memory:///globq/ayb.svs",
    ]


def test_colliding_ids_get_stable_distinct_suffixes():
    urls = ["/d/a b.svs", "/d/a_b.svs", "/e/a_b.tif", "/d/c.svs"]
    ids, renamed = unique_slide_ids(urls)
    assert ids[1] == "a_b" and ids[3] == "c"  # the slide named a_b keeps its id (then: first by URL)
    for i in (0, 2):
        assert ids[i] == "a_b-" + hashlib.sha256(urls[i].encode()).hexdigest()[:8]
    assert renamed == {urls[0]: ids[0], urls[2]: ids[2]}
    # deterministic: the same ids whatever the order, and a slide's suffix depends on its URL only
    rev, _ = unique_slide_ids(urls[::-1])
    assert rev[::-1] == ids
    alone, _ = unique_slide_ids(urls[:2])
    assert alone == ids[:2]
    # an id given by the user keeps it; derived ones move aside; two given ones are refused
    assert unique_slide_ids(["/e/a b.svs", "/d/a b.svs"])[0] == [
        "a_b-" + hashlib.sha256(b"/e/a b.svs").hexdigest()[:8],
        "a_b",
    ]  # none is named a_b: the first by URL keeps it
    ids2, _ = unique_slide_ids(["/z/x.svs", "/a/x.svs"], ["x", "x"], given=[True, False])
    assert ids2[0] == "x" and ids2[1].startswith("x-")
    with pytest.raises(ValueError, match="both given the id 'x'"):
        unique_slide_ids(["/z/1.svs", "/a/2.svs"], ["x", "x"], given=[True, True])
    assert unique_slide_ids(["/d/s.svs", "/d/s.svs"]) == (["s", "s"], {})  # one slide listed twice


def test_resolve_slides_reports_collisions_instead_of_refusing(tmp_path, caplog):
    a = make_embed_slide(tmp_path / "a b.svs")
    b = shutil.copy(a, tmp_path / "a_b.svs")
    with caplog.at_level("WARNING", logger="wsi.loader"):
        specs = resolve_slides(tmp_path)
    ids = {s.url: s.slide_id for s in specs}
    assert ids[str(b)] == "a_b" and ids[str(a)].startswith("a_b-")
    assert f"{a} shares its slide id" in caplog.text
    assert resolve_slides([SlideSpec(str(a), "mine"), str(b)])[0].slide_id == "mine"
    assert safe_slide_id(str(tmp_path / "café.svs")) == "café"

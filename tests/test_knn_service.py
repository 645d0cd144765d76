"""clip-retrieval's API on the search server (issue 14): ``POST /knn-service``, ``POST /metadata``
and ``GET /indices-list`` answer as clip-retrieval 2.45.0's back-end does, over the server's own
search calls, and clip-retrieval's real ``ClipClient`` gets the server's results unchanged.
Its result filters are checked against clip_back's rules (deduplication) and against embeddings
fetched through the public API (zero-shot prompts); live servers listen on 127.0.0.1 only."""

from __future__ import annotations

import base64
import http.server
import importlib.util
import itertools
import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

import clipforge
from clipforge.search import SearchIndex, build_index
from clipforge.search.index import MAX_K
from clipforge.search.knn_service import (
    DEDUP_THRESHOLD,
    FILTERS_HEADER,
    IGNORED_HEADER,
    LIMITED_HEADER,
    PromptFilter,
    near_duplicates,
)
from clipforge.search.server import create_app, running_server

LOOPBACK = "http://127.0.0.1"
TOKEN = "s3cret-Token_for-tests-0123456789"
ALL = 8  # items in the shared index (the sample photos)
NO_FILTERS = {"deduplicate": False, "use_safety_model": False, "use_violence_detector": False}
# Prompts for the zero-shot filter tests: the pair whose split of the photos is mixed, with the
# widest margin, is chosen by embeddings fetched through /api/embed (the model is untrained).
CANDIDATE_PROMPTS = ("a cat", "a dog", "a rocket", "a horse", "a cup of coffee", "a page of text",
                     "an astronaut", "a motorcycle", "red", "blue", "night", "a tree")


@pytest.fixture(scope="module")
def client(index: SearchIndex) -> Iterator[TestClient]:
    with TestClient(create_app(index), base_url=LOOPBACK) as c:
        yield c


def knn(client: TestClient, path: str = "/knn-service", **fields) -> httpx.Response:
    """POST a JSON body without a Content-Type, as ClipClient (requests, ``data=``) does."""
    return client.post(path, content=json.dumps(fields))


def ranked(results: list[dict]) -> list[tuple[int, float]]:
    return [(r["id"], r["similarity"]) for r in results]


def search_ranked(results: list[dict]) -> list[tuple[int, float]]:
    return [(r["id"], r["score"]) for r in results]


def photo_b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


# ------------------------------------------------------------------------ shapes and queries
def test_indices_list_names_the_index_folder(client: TestClient, index: SearchIndex) -> None:
    answer = client.get("/indices-list")
    assert answer.status_code == 200
    assert answer.json() == [index.path.name] and "/" not in index.path.name


def test_text_query_agrees_with_api_search_in_clip_back_shape(client: TestClient,
                                                             index: SearchIndex) -> None:
    answer = knn(client, text="a cat", num_images=3, num_result_ids=ALL, **NO_FILTERS)
    assert answer.status_code == 200, answer.text
    assert str(index.path.parent) not in answer.text
    assert answer.headers[FILTERS_HEADER] == "none"
    results = answer.json()
    expected = client.get("/api/search", params={"q": "a cat", "k": ALL}).json()["results"]
    assert ranked(results) == search_ranked(expected) and len(results) == ALL
    # The first num_images carry metadata; the rest only id and similarity, as in clip_back.
    for result, hit in zip(results[:3], expected):
        assert result == {"id": hit["id"], "similarity": hit["score"], "path": hit["path"],
                          "url": f"{LOOPBACK}/thumbnails/{hit['id']}"}  # no caption: none
    assert all(set(r) == {"id", "similarity"} for r in results[3:])
    thumbnail = client.get(results[0]["url"])
    assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/jpeg"


def test_image_query_agrees_with_image_search(client: TestClient, photos: list[Path]) -> None:
    photo = next(p for p in photos if p.name.startswith("chelsea"))
    answer = knn(client, image=photo_b64(photo), num_images=ALL, **NO_FILTERS)
    assert answer.status_code == 200, answer.text
    expected = client.post("/api/search/image", files={"file": (photo.name, photo.read_bytes())},
                           data={"k": ALL}).json()["results"]
    assert ranked(answer.json()) == search_ranked(expected)
    assert answer.json()[0]["path"] == photo.name and answer.json()[0]["similarity"] > 0.999


def test_embedding_input_agrees_with_the_text_it_embeds(client: TestClient) -> None:
    vector = client.post("/api/embed", json={"texts": ["a rocket"]}).json()["texts"][0]
    expected = client.get("/api/search", params={"q": "a rocket", "k": 5}).json()["results"]
    for scale in (1.0, 3.0):  # normalised: any length of the same direction
        answer = knn(client, embedding_input=[scale * v for v in vector], num_images=5,
                     **NO_FILTERS)
        assert answer.status_code == 200, answer.text
        assert [r["id"] for r in answer.json()] == [r["id"] for r in expected]
        assert np.allclose([r["similarity"] for r in answer.json()],
                           [r["score"] for r in expected], atol=1e-5)


def test_clip_client_defaults_are_accepted(client: TestClient) -> None:
    """ClipClient always sends aesthetic_score 9 and weight 0.5 (ignored here, and said so),
    the filters on, and num_result_ids equal to num_images."""
    answer = knn(client, text="a cat", image=None, image_url=None, embedding_input=None,
                 deduplicate=True, use_safety_model=True, use_violence_detector=True,
                 indice_name=client.get("/indices-list").json()[0], use_mclip=False,
                 aesthetic_score=9, aesthetic_weight=0.5, modality="image", num_images=40,
                 num_result_ids=40)
    assert answer.status_code == 200, answer.text
    assert answer.headers[IGNORED_HEADER] == "aesthetic_score, aesthetic_weight"
    assert answer.headers[FILTERS_HEADER] == (f"deduplicate=inner-product>{DEDUP_THRESHOLD:g}; "
                                              "safety=zero-shot-prompts; "
                                              "violence=zero-shot-prompts")
    everything = {r["id"] for r in knn(client, text="a cat", **NO_FILTERS).json()}
    assert {r["id"] for r in answer.json()} <= everything


def test_the_front_end_query_is_answered(client: TestClient, index: SearchIndex) -> None:
    """What clip-retrieval's web front-end posts (read from its bundled main.js): a fetch()
    with a string body (sent as text/plain), 3000 ids, the aesthetic fields as strings."""
    body = {"text": "a cat", "image": None, "image_url": None, "embedding_input": None,
            "modality": "image", "num_images": 40, "indice_name": index.path.name,
            "num_result_ids": 3000, "use_mclip": False, "deduplicate": True,
            "use_safety_model": True, "use_violence_detector": True, "aesthetic_score": "",
            "aesthetic_weight": "0.5"}
    answer = client.post("/knn-service", content=json.dumps(body),
                         headers={"Content-Type": "text/plain;charset=UTF-8"})
    assert answer.status_code == 200, answer.text
    assert IGNORED_HEADER not in answer.headers  # no aesthetic score asked for
    assert all({"id", "similarity", "url"} <= set(r) for r in answer.json())


def test_num_result_ids_beyond_the_limit_is_lowered_and_said(client: TestClient) -> None:
    """clip-retrieval's front-end asks for 3000 ids on every query."""
    answer = knn(client, text="a cat", num_images=40, num_result_ids=3000, **NO_FILTERS)
    assert answer.status_code == 200
    assert answer.headers[LIMITED_HEADER].startswith(f"num_result_ids={MAX_K} (asked 3000")
    assert len(answer.json()) == ALL


# -------------------------------------------------------------------------------- dedup
@pytest.fixture(scope="module")
def dup_index(photo_dir: Path, model: clipforge.CLIP,
              tmp_path_factory: pytest.TempPathFactory) -> SearchIndex:
    """Four items from a table with captions and a metadata column; the cat twice (one file
    copied), the other photos far from it and from each other (inner products below 0.9)."""
    folder = tmp_path_factory.mktemp("dups")
    for name in ("chelsea.png", "page.png", "rocket.jpg"):
        shutil.copy(photo_dir / name, folder / name)
    shutil.copy(photo_dir / "chelsea.png", folder / "chelsea-copy.png")
    table = folder / "photos.csv"
    table.write_text("filepath,title,photographer\nchelsea.png,a tabby cat,Ann\n"
                     "chelsea-copy.png,the same cat,Bob\npage.png,a page,Cy\n"
                     "rocket.jpg,a rocket,Di\n", encoding="utf-8")
    build_index(table, folder / "dups.idx", model, progress=False)
    return SearchIndex.open(folder / "dups.idx", model)


def test_deduplicate_drops_an_exact_duplicate_only(dup_index: SearchIndex,
                                                   photo_dir: Path) -> None:
    query = {"image": photo_b64(photo_dir / "chelsea.png"), "num_images": 4}
    with TestClient(create_app(dup_index), base_url=LOOPBACK) as c:
        every = knn(c, **query, **NO_FILTERS).json()
        deduplicated = knn(c, **query, **{**NO_FILTERS, "deduplicate": True}).json()
    assert len(every) == 4
    assert {r["caption"] for r in every[:2]} == {"a tabby cat", "the same cat"}
    assert every[1]["similarity"] > 0.999  # the copy: the same embedding
    assert deduplicated == [every[0]] + every[2:]  # the lower-ranked twin left out
    assert {r["photographer"] for r in every} == {"Ann", "Bob", "Cy", "Di"}  # metadata columns


def test_near_duplicates_links_chains_as_clip_back_does() -> None:
    def unit(degrees: float) -> list[float]:
        return [np.cos(np.radians(degrees)), np.sin(np.radians(degrees)), 0.0]

    step = np.degrees(np.arccos(0.95))  # neighbours at 0.95, the chain's ends at cos(2 step)
    rows = np.array([unit(0), unit(90), unit(step), unit(2 * step)], np.float32)
    assert float(rows[0] @ rows[3]) < DEDUP_THRESHOLD
    assert near_duplicates(rows).tolist() == [False, False, True, True]
    apart = np.array([unit(0), unit(np.degrees(np.arccos(0.93)))], np.float32)
    assert near_duplicates(apart).tolist() == [False, False]
    assert near_duplicates(rows[:1]).tolist() == [False]
    assert near_duplicates(np.zeros((0, 3), np.float32)).tolist() == []


# --------------------------------------------------------------------- zero-shot filters
def oracle_flags(client: TestClient, photos: list[Path], flagged: tuple[str, ...],
                 allowed: tuple[str, ...]) -> tuple[dict[str, bool], float]:
    """For each photo's name: is its embedding (computed afresh by /api/embed) nearest to a
    flagged prompt; and the smallest margin between the flagged and allowed best scores."""
    prompts = np.array(client.post("/api/embed", json={"texts": [*flagged, *allowed]}
                                   ).json()["texts"])
    flags, margin = {}, np.inf
    for photo in photos:
        vector = np.array(client.post("/api/embed", files={
            "file": (photo.name, photo.read_bytes())}).json()["image"])
        scores = prompts @ vector
        best_flagged, best_allowed = scores[:len(flagged)].max(), scores[len(flagged):].max()
        flags[photo.name] = bool(best_flagged > best_allowed)
        margin = min(margin, abs(best_flagged - best_allowed))
    return flags, margin


@pytest.fixture(scope="module")
def mixed_prompts(client: TestClient, photos: list[Path]
                  ) -> tuple[PromptFilter, dict[str, bool]]:
    """The candidate pair that flags some photos but not all, by the widest margin."""
    best = None
    for a, b in itertools.combinations(CANDIDATE_PROMPTS, 2):
        flags, margin = oracle_flags(client, photos, (a,), (b,))
        if 0 < sum(flags.values()) < len(flags) and (best is None or margin > best[2]):
            best = (PromptFilter((a,), (b,)), flags, margin)
    assert best is not None and best[2] > 2e-3, "no candidate prompts split the photos clearly"
    return best[0], best[1]


@pytest.mark.parametrize("field", ["use_safety_model", "use_violence_detector"])
def test_filters_drop_the_results_nearest_to_flagged_prompts(
        index: SearchIndex, photos: list[Path], mixed_prompts, field: str) -> None:
    prompts, flags = mixed_prompts
    swapped = PromptFilter(prompts.allowed, prompts.flagged)
    option = "safety_prompts" if field == "use_safety_model" else "violence_prompts"
    kept = {}
    for name, chosen in (("as chosen", prompts), ("swapped", swapped)):
        with TestClient(create_app(index, **{option: chosen}), base_url=LOOPBACK) as c:
            answer = knn(c, text="a photo", num_images=ALL, **{**NO_FILTERS, field: True})
        assert answer.status_code == 200, answer.text
        assert "zero-shot-prompts" in answer.headers[FILTERS_HEADER]
        kept[name] = {r["path"] for r in answer.json()}
    assert kept["as chosen"] == {name for name, flagged in flags.items() if not flagged}
    assert kept["swapped"] == {name for name, flagged in flags.items() if flagged}


def test_prompt_filters_are_checked(index: SearchIndex) -> None:
    for flagged, allowed in [((), ("a photo",)), ("nudity", ("a photo",)),
                             (("nudity",), ("",)), (("x" * 1001,), ("a photo",))]:
        with pytest.raises(ValueError, match="prompt"):
            PromptFilter(flagged, allowed)
    assert PromptFilter(["a"], ["b"]).flagged == ("a",)  # lists are taken as tuples


# ----------------------------------------------------------------------- refusals
def test_indice_name_must_be_the_served_one(client: TestClient, index: SearchIndex) -> None:
    for path, body in [("/knn-service", {"text": "a cat"}), ("/metadata", {"ids": [1]})]:
        wrong = knn(client, path, indice_name="laion5B-H-14", **body)
        assert wrong.status_code == 400
        assert "'laion5B-H-14'" in wrong.json()["detail"]
        assert repr([index.path.name]) in wrong.json()["detail"]
        assert knn(client, path, indice_name=index.path.name, **body).status_code == 200
        assert knn(client, path, **body).status_code == 200  # absent: the one index


def test_text_modality_and_mclip_are_refused(client: TestClient) -> None:
    text = knn(client, text="a cat", modality="text")
    assert text.status_code == 400 and "image embeddings only" in text.json()["detail"]
    mclip = knn(client, text="a cat", use_mclip=True)
    assert mclip.status_code == 400 and mclip.json()["detail"].startswith("use_mclip")


@pytest.fixture(scope="module")
def photo_site(photo_dir: Path) -> Iterator[str]:
    """The sample photos over plain HTTP on a loopback port: the target of image_url."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(photo_dir), **kwargs)

        def log_message(self, *args) -> None:
            pass

    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=site.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{site.server_address[1]}"
    finally:
        site.shutdown()
        thread.join(10)


def test_image_url_is_refused_unless_allowed(client: TestClient, index: SearchIndex,
                                             photo_site: str, photo_dir: Path) -> None:
    url = f"{photo_site}/chelsea.png"
    refused = knn(client, image_url=url)
    assert refused.status_code == 400 and refused.json()["detail"].startswith("image_url")
    with TestClient(create_app(index, allow_image_urls=True), base_url=LOOPBACK) as c:
        fetched = knn(c, image_url=url, num_images=ALL, **NO_FILTERS)
        sent = knn(c, image=photo_b64(photo_dir / "chelsea.png"), num_images=ALL, **NO_FILTERS)
        missing = knn(c, image_url=f"{photo_site}/gone.png")
        local = knn(c, image_url=f"file://{photo_dir / 'chelsea.png'}")
    assert fetched.status_code == 200 and fetched.json() == sent.json()
    assert missing.status_code == 400 and "404" in missing.json()["detail"]
    assert local.status_code == 400 and "http" in local.json()["detail"]


@pytest.mark.parametrize(("body", "field"), [
    (b"", "body"), (b"[1, 2]", "body"), (b"{", "body"), (b'"text"', "body"),
    (b'{"text": 5}', "text"), (json.dumps({"text": "x" * 1001}).encode(), "text"),
    (b'{"text": "a", "num_images": "many"}', "num_images"),
    (b'{"text": "a", "num_images": 0}', "num_images"),
    (b'{"text": "a", "num_images": 1001}', "num_images"),
    (b'{"text": "a", "num_result_ids": -1}', "num_result_ids"),
    (b'{"text": "a", "deduplicate": "perhaps"}', "deduplicate"),
    (b'{"text": "a", "modality": "audio"}', "modality"),
    (b'{"embedding_input": [1, 2, 3]}', "embedding_input"),
    (b'{"embedding_input": "abc"}', "embedding_input"),
    (b'{"image": "not base64!"}', "image"),
    (b'{"image": "aGVsbG8gd29ybGQ="}', "image"),  # base64 of "hello world": not an image
    (b'{"text": "a", "image": "aGVsbG8="}', "text, image"),
    (b"{}", "text, image (base64), image_url or embedding_input"),
    (b'{"text": "  "}', "empty"),
])
def test_malformed_knn_queries_get_400_naming_the_field(client: TestClient, body: bytes,
                                                        field: str) -> None:
    answer = client.post("/knn-service", content=body, headers={"Content-Type": "text/plain"})
    assert answer.status_code == 400, answer.text
    assert field in answer.json()["detail"]


def test_embedding_input_must_be_finite_and_not_zero(client: TestClient,
                                                     index: SearchIndex) -> None:
    dim = index.info["embed_dim"]
    zero = knn(client, embedding_input=[0.0] * dim)
    assert zero.status_code == 400 and "not all zero" in zero.json()["detail"]
    for literal in (b"NaN", b"Infinity", b"1e400"):
        answer = client.post("/knn-service", content=b'{"embedding_input": [' + literal
                             + b", 1" * (dim - 1) + b"]}")
        assert answer.status_code == 400, literal
    huge = knn(client, embedding_input=[1e300] * dim, num_images=3, **NO_FILTERS)  # a direction
    assert huge.status_code == 200 and len(huge.json()) == 3


@pytest.mark.parametrize(("body", "field"), [
    (b"{}", "ids"), (b'{"ids": "1, 2"}', "ids"), (b'{"ids": [-1]}', "ids.0"),
    (json.dumps({"ids": list(range(MAX_K + 1))}).encode(), "ids"), (b"nope", "body")])
def test_malformed_metadata_queries_get_400(client: TestClient, body: bytes, field: str) -> None:
    answer = client.post("/metadata", content=body)
    assert answer.status_code == 400 and answer.json()["detail"].startswith(field)


# ------------------------------------------------------------------------------ metadata
def test_metadata_completes_the_results_past_num_images(dup_index: SearchIndex) -> None:
    with TestClient(create_app(dup_index), base_url=LOOPBACK) as c:
        full = knn(c, text="a cat", num_images=4, **NO_FILTERS).json()
        short = knn(c, text="a cat", num_images=1, num_result_ids=4, **NO_FILTERS).json()
        ids = [r["id"] for r in short[1:]]
        answer = knn(c, "/metadata", ids=[*ids, 10**6], indice_name="dups.idx")
    assert answer.status_code == 200
    assert answer.json() == [  # the unknown id left out
        {"id": r["id"], "metadata": {k: v for k, v in r.items() if k not in ("id", "similarity")}}
        for r in full[1:]]
    assert {"caption", "url", "path", "photographer"} == set(answer.json()[0]["metadata"])


# ------------------------------------------------------------------------------ the token
def test_the_routes_need_the_token_like_the_rest_of_the_api(index: SearchIndex) -> None:
    with TestClient(create_app(index, token=TOKEN), base_url=LOOPBACK) as c:
        refused = [c.get("/indices-list"), knn(c, text="a cat"), knn(c, "/metadata", ids=[1])]
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        allowed = [c.get("/indices-list", headers=bearer),
                   c.post("/knn-service", content=json.dumps({"text": "a cat"}),
                          headers=bearer)]
        paths = c.get("/openapi.json").json()["paths"]
    assert [r.status_code for r in refused] == [401] * 3
    assert paths["/knn-service"]["post"]["security"] == [{"bearer": []}]  # /docs sends it
    assert [r.status_code for r in allowed] == [200] * 2


# ------------------------------------------------------------------- the real ClipClient
@pytest.fixture(scope="module")
def clip_client_module() -> Iterator[ModuleType]:
    """clip-retrieval's clip_client.py, loaded by file: its package __init__ imports the whole
    back-end (flask, faiss, pandas...), installed without dependencies.  The client itself
    needs only ``requests`` (a test dependency)."""
    spec = importlib.util.find_spec("clip_retrieval")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("clip-retrieval is not installed (make setup installs clip-retrieval==2.45.0 "
                    "--no-deps)")
    path = Path(spec.submodule_search_locations[0]) / "clip_client.py"
    module_spec = importlib.util.spec_from_file_location("_reference_clip_client", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_the_real_clip_client_gets_our_results(clip_client_module: ModuleType,
                                               index: SearchIndex, photo_dir: Path) -> None:
    ClipClient, Modality = clip_client_module.ClipClient, clip_client_module.Modality
    photo = photo_dir / "rocket.jpg"
    with running_server(create_app(index)) as url, httpx.Client(base_url=url) as http:
        name = http.get("/indices-list").json()[0]
        client = ClipClient(url=f"{url}/knn-service", indice_name=name, num_images=ALL,
                            modality=Modality.IMAGE, deduplicate=False, use_safety_model=False,
                            use_violence_detector=False)
        by_text = client.query(text="a cat")
        by_image = client.query(image=str(photo))
        vector = http.post("/api/embed", json={"texts": ["a cat"]}).json()["texts"][0]
        by_vector = client.query(embedding_input=vector)
        filtered = ClipClient(url=f"{url}/knn-service", indice_name=name).query(text="a cat")
        text_hits = http.get("/api/search", params={"q": "a cat", "k": ALL}).json()["results"]
        image_hits = http.post("/api/search/image", files={"file": (photo.name,
                               photo.read_bytes())}, data={"k": ALL}).json()["results"]
    assert by_text == [{"id": h["id"], "similarity": h["score"], "path": h["path"],
                        "url": f"{url}/thumbnails/{h['id']}"} for h in text_hits]
    assert ranked(by_image) == search_ranked(image_hits) and by_image[0]["path"] == photo.name
    assert [r["id"] for r in by_vector] == [h["id"] for h in text_hits]
    assert isinstance(filtered, list) and {r["id"] for r in filtered} <= {r["id"] for r in by_text}


def test_serve_flag_enables_image_urls() -> None:
    """``clipforge serve --allow-image-urls`` reaches create_app; without it nothing is set and
    create_app's default (refused) holds."""
    from clipforge.cli import build_parser
    from clipforge.commands.search import _app_options

    parser = build_parser()
    assert _app_options(parser.parse_args(["serve", "IDX", "--allow-image-urls"])
                        )["allow_image_urls"] is True
    assert "allow_image_urls" not in _app_options(parser.parse_args(["serve", "IDX"]))

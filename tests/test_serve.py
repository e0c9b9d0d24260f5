"""`diffret serve`'s app over a stand-in Searcher (tests/serve_client.py FakeSearcher): the API, byte
ranges, hostile paths and ids, missing files, errors without traces, clients that disconnect. The
real Searcher and a real browser: tests/test_serve_browser.py."""
from __future__ import annotations

import io
import os
import sys
import shutil
import socket
import time
from urllib.parse import quote, urlsplit

import pytest
import torch
from PIL import Image

from diffret.pipeline.serve.app import create_app
from diffret.pipeline.serve.config import ServeOptions
from diffret.pipeline.serve.media import MediaTable, media_id, parse_range
from diffret.pipeline.serve.server import bind, serve_in_thread
from diffret.pipeline.serve.thumbs import LRUBytes
from serve_client import FakeSearcher, get

SECRET = b"root:x:0:0:SECRET-FILE-CONTENT"


@pytest.fixture(scope="module")
def files(demo_root, tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    real = sorted((demo_root / "videos").glob("*.mp4"))[0]
    blob = d / "media" / "blob.mp4"
    blob.parent.mkdir()
    blob.write_bytes(os.urandom(3 * 2**20 + 123))
    (d / "media" / "secret.txt").write_bytes(SECRET)  # beside a served file: never served
    (d / "link.mp4").symlink_to(real)
    shutil.copy(blob, d / "moved.mp4")
    c = str(d / "cache")
    videos = [
        {"cache": c, "video_id": "red circle", "path": str(real), "duration": 3.0, "split": "test"},
        {"cache": c, "video_id": "dir/../../media/secret.txt", "path": str(blob), "duration": None, "split": "gallery"},
        {"cache": c, "video_id": "linked red", "path": str(d / "link.mp4"), "duration": 3.0, "split": "test"},
        {"cache": c, "video_id": "missing", "path": str(d / "gone.mp4"), "duration": 3.0, "split": "test"},
        {"cache": c, "video_id": "nopath", "path": None, "duration": None, "split": "test"},
        {"cache": c, "video_id": "moved", "path": str(d / "moved.mp4"), "duration": 3.0, "split": "test"},
    ]
    return {"dir": d, "real": real, "blob": blob, "videos": videos}


@pytest.fixture(scope="module")
def server(files):
    searcher = FakeSearcher(files["videos"])
    app = create_app(searcher, ServeOptions(thumb_width=64, max_k=4, k=3))
    with serve_in_thread(app) as url:
        yield {"url": url, "searcher": searcher, "app": app, "ids": [e.media_id for e in app.state.table.entries]}


def no_trace(r):
    assert "Traceback" not in r.text and 'File "' not in r.text and "secret internal" not in r.text


def test_info_and_page(server):
    r = get(server["url"], "/api/info")
    assert r.status == 200 and r.json() == {"videos": 6, "has_generator": False, "k": 3, "max_k": 4,
                                            "max_query_chars": 200}
    page = get(server["url"], "/")
    assert page.status == 200 and page.headers["content-type"].startswith("text/html")
    assert "/static/app.js" in page.text and "http" not in page.text.replace("http-equiv", "")  # nothing from elsewhere
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        r = get(server["url"], f"/static/{name}")
        assert r.status == 200 and r.headers["content-type"].startswith(kind) and len(r.body) > 100


def test_search_hits_carry_opaque_media_ids(server, files):
    r = get(server["url"], "/api/search?q=red+circle&k=2")
    assert r.status == 200, r.text
    body = r.json()
    assert body["query"] == "red circle" and body["k"] == 2 and len(body["hits"]) == 2
    top = body["hits"][0]
    assert top["video_id"] == "red circle" and top["rank"] == 1 and top["evidence"]["best_time"] == 0.5
    for h in body["hits"]:
        assert h["media_id"] == media_id(h["cache"], h["video_id"]) == server["ids"][h["video_index"]]
        assert len(h["media_id"]) == 16 and h["video_id"] not in h["media_id"]
        meta = get(server["url"], f"/api/videos/{h['media_id']}").json()
        assert meta["video_id"] == h["video_id"] and meta["video_index"] == h["video_index"]
        assert "path" not in meta  # the metadata endpoint names no file


def test_bad_queries_are_400_with_a_message(server):
    long = "a" * 201
    for path, words in ((f"/api/search?q={long}", "too long"), ("/api/search?q=", "empty"),
                        ("/api/search?q=%20%20", "empty"), ("/api/search", "empty"),
                        ("/api/search?q=red&k=0", "k must be"), ("/api/search?q=red&k=-3", "k must be"),
                        ("/api/search?q=red&k=abc", "k must be"), ("/api/search?q=red&k=1e3", "k must be"),
                        ("/api/search?q=red&k=" + "9" * 40, "k must be"), ("/api/search?q=red&order=best", "order")):
        r = get(server["url"], path)
        assert r.status == 400, (path, r.status, r.text)
        assert words in r.json()["error"], (path, r.text)
        no_trace(r)


def test_k_is_bounded(server):
    for k in ("4", "5", "1000000"):  # max_k 4: a larger k is clamped, never passed on
        r = get(server["url"], f"/api/search?q=red&k={k}")
        assert r.status == 200 and len(r.json()["hits"]) == 4 and r.json()["k"] == 4
    assert len(get(server["url"], "/api/search?q=red").json()["hits"]) == 3  # the default k


def test_internal_error_has_no_trace(server):
    r = get(server["url"], "/api/search?q=boom")
    assert r.status == 500 and r.json()["error"].startswith("internal server error")
    no_trace(r)
    assert get(server["url"], "/api/search?q=red").status == 200  # and the server goes on


def test_stage1_order_with_a_generator(files):
    searcher = FakeSearcher(files["videos"], has_generator=True)
    with serve_in_thread(create_app(searcher, ServeOptions(max_k=6, k=3))) as url:
        final = get(url, "/api/search?q=red+circle&k=3").json()
        stage1 = get(url, "/api/search?q=red+circle&k=3&order=stage1").json()
    assert final["has_generator"] and stage1["order"] == "stage1"
    assert [h["stage1_rank"] for h in stage1["hits"]] == [1, 2, 3]
    assert stage1["hits"][0]["video_id"] == "red circle"
    assert [h["rank"] for h in final["hits"]] == [1, 2, 3] and final["hits"][0]["stage1_rank"] == 6


def test_media_whole_and_ranges(server, files):
    url, mid = server["url"], server["ids"][1]
    data = files["blob"].read_bytes()
    size = len(data)
    r = get(url, f"/media/{mid}")
    assert r.status == 200 and r.body == data and r.headers["accept-ranges"] == "bytes"
    assert r.headers["content-length"] == str(size)
    for header, (a, b) in (("bytes=10-19", (10, 19)), ("bytes=100-", (100, size - 1)), ("bytes=-5", (size - 5, size - 1)),
                           ("bytes=0-0", (0, 0)), (f"bytes={size - 3}-{size + 100}", (size - 3, size - 1))):
        r = get(url, f"/media/{mid}", {"Range": header})
        assert r.status == 206, header
        assert r.headers["content-range"] == f"bytes {a}-{b}/{size}", header
        assert r.body == data[a:b + 1] and r.headers["content-length"] == str(b + 1 - a)
    r = get(url, f"/media/{mid}", {"Range": f"bytes={size}-"})
    assert r.status == 416 and r.headers["content-range"] == f"bytes */{size}"
    head = get(url, f"/media/{mid}", method="HEAD")
    assert head.status == 200 and head.body == b"" and head.headers["content-length"] == str(size)
    real = get(url, f"/media/{server['ids'][0]}", {"Range": "bytes=0-3"})
    assert real.status == 206 and real.headers["content-type"] == "video/mp4"


def test_malformed_range_is_ignored(server, files):
    """RFC 9110 lets a server ignore a Range it cannot use: the whole file, 200; the server goes on."""
    url, mid = server["url"], server["ids"][1]
    data = files["blob"].read_bytes()
    for header in ("bytes=abc", "items=0-1", "bytes=5-2", "bytes=0-1,4-5", "bytes=-", "bytes", "bytes=" + "9" * 30,
                   "bytes=\x7f0-1", "=0-1"):
        r = get(url, f"/media/{mid}", {"Range": header})
        assert r.status == 200 and r.body == data, header
    assert get(url, "/api/info").status == 200


def test_parse_range():
    assert parse_range(None, 10) is None and parse_range("bytes=2-4", 10) == (2, 4)
    assert parse_range("bytes=-20", 10) == (0, 9) and parse_range("bytes=-0", 10) is False
    assert parse_range("bytes=10-", 10) is False and parse_range("bytes=0-", 0) is False
    assert parse_range(" bytes = 3 - ", 10) == (3, 9) and parse_range("bytes=4-3", 10) is None


TRAVERSALS = [
    "/media/../../etc/passwd", "/media/..%2F..%2Fetc%2Fpasswd", "/media/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/media/%252e%252e%252fetc%252fpasswd", "/media/%252E%252E%252Fmedia%252Fsecret.txt", "/media//etc/passwd",
    "/media/%2Fetc%2Fpasswd", "/media/etc/passwd", "/media/..", "/media/.", "/media/%2e%2e", "/media/~root",
    "/media/%00", "/media/secret.txt", "/media/dir%2F..%2F..%2Fmedia%2Fsecret.txt",
    "/thumb/..%2Fsecret.txt?t=0", "/thumb/%2e%2e%2fsecret.txt", "/api/videos/..%2F..%2Fetc%2Fpasswd",
    "/static/../app.py", "/static/..%2Fapp.py", "/static/%2e%2e%2fapp.py", "/static/%252e%252e%252fapp.py",
    "/static/index.html/../../app.py", "/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd",
]


def test_traversal_and_path_like_ids_are_404(server, files):
    url = server["url"]
    paths = list(TRAVERSALS)
    for v in files["videos"]:  # a video id, or a path, in place of the opaque id
        paths += [f"/media/{quote(v['video_id'], safe='')}", f"/media/{quote(v['video_id'])}"]
        if v["path"]:
            paths += [f"/media/{quote(v['path'], safe='')}", f"/thumb/{quote(v['path'], safe='')}",
                      f"/media/{quote(quote(v['path'], safe=''), safe='')}"]
    paths += ["/media/0", "/media/1", f"/media/{server['ids'][1].upper()}", f"/media/{server['ids'][1]}0",
              f"/media/{server['ids'][1][:-1]}", "/media/" + "f" * 16, "/thumb/" + "0" * 16, "/api/videos/" + "a" * 16]
    for path in paths:
        r = get(url, path)
        assert r.status == 404, (path, r.status)
        assert SECRET not in r.body and b"root:" not in r.body and b"import" not in r.body, path
        assert r.json()["error"], path
        no_trace(r)


def test_missing_or_moved_video(server, files):
    url, ids = server["url"], server["ids"]
    for mid in (ids[3], ids[4]):  # listed file gone; no file at all
        assert get(url, f"/media/{mid}").status == 404
        t = get(url, f"/thumb/{mid}?t=1")
        assert t.status == 200 and t.headers["x-diffret-placeholder"] == "1"
        assert Image.open(io.BytesIO(t.body)).format == "JPEG"
        assert get(url, f"/api/videos/{mid}").json()["available"] is False
    assert get(url, f"/media/{ids[5]}", {"Range": "bytes=0-9"}).status == 206
    moved = files["dir"] / "moved.mp4"
    moved.rename(files["dir"] / "elsewhere.mp4")  # moved after start-up
    try:
        assert get(url, f"/media/{ids[5]}").status == 404
        assert get(url, f"/thumb/{ids[5]}?t=0").headers.get("x-diffret-placeholder") == "1"
        moved.symlink_to(files["blob"])  # a symlink put in its place after start-up is not followed
        assert get(url, f"/media/{ids[5]}").status == 404
    finally:
        moved.unlink(missing_ok=True)
        (files["dir"] / "elsewhere.mp4").rename(moved)
    assert get(url, "/api/search?q=missing+moved").json()["hits"][0]["video_id"] in ("missing", "moved")


def test_listed_symlink_is_served_as_its_target(server, files):
    r = get(server["url"], f"/media/{server['ids'][2]}")
    assert r.status == 200 and r.body == files["real"].read_bytes()
    assert server["app"].state.table.entries[2].path == files["real"].resolve()


def test_thumbnails(server):
    url, mid = server["url"], server["ids"][0]
    thumbs = server["app"].state.thumbs
    r = get(url, f"/thumb/{mid}?t=1.5")
    assert r.status == 200 and r.headers["content-type"] == "image/jpeg" and "x-diffret-placeholder" not in r.headers
    img = Image.open(io.BytesIO(r.body))
    assert img.format == "JPEG" and 0 < img.width <= 64
    hits = thumbs.cache.hits
    assert get(url, f"/thumb/{mid}?t=1.52").body == r.body and thumbs.cache.hits == hits + 1  # same 0.1 s slot
    assert get(url, f"/thumb/{mid}?t=999").status == 200  # past the end: clamped to the duration
    assert get(url, f"/thumb/{server['ids'][1]}?t=0").headers["x-diffret-placeholder"] == "1"  # not a video
    for t in ("abc", "nan", "inf", "-1", "1" * 40, ""):
        r = get(url, f"/thumb/{mid}?t={t}")
        assert r.status == 400 and "t must be" in r.json()["error"], t


def test_lru_is_bounded():
    lru = LRUBytes(100)
    for i in range(10):
        lru.put(i, bytes(30))
    assert lru.nbytes <= 100 and len(lru) == 3 and lru.get(9) is not None and lru.get(0) is None
    lru.put("big", bytes(101))  # larger than the bound: not kept
    assert lru.get("big") is None and lru.nbytes <= 100


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_disconnect_mid_download(server):
    url, mid = server["url"], server["ids"][1]
    u = urlsplit(url)
    get(url, f"/media/{mid}", {"Range": "bytes=0-0"})
    before = _open_fds()
    for i in range(12):
        s = socket.create_connection((u.hostname, u.port))
        rng = b"Range: bytes=1000-\r\n" if i % 2 else b""
        s.sendall(b"GET /media/" + mid.encode() + b" HTTP/1.1\r\nHost: x\r\n" + rng + b"\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 20")
        s.close()  # gone with most of the file unread
    assert get(url, "/api/info").status == 200
    for _ in range(100):  # the server notices each disconnect and closes the file
        if _open_fds() <= before:
            break
        time.sleep(0.05)
    assert _open_fds() <= before
    assert get(url, f"/media/{mid}", {"Range": "bytes=0-9"}).status == 206


def test_method_and_unknown_route(server):
    r = get(server["url"], "/api/search?q=x", method="POST")
    assert r.status == 405 and r.json()["error"] == "method not allowed"
    assert get(server["url"], "/nowhere").json() == {"error": "not found"}


def test_duplicate_videos_get_one_id():
    v = {"cache": "c", "video_id": "a", "path": None}
    t = MediaTable([v, dict(v), {**v, "video_id": "b"}])
    assert len(t) == 2 and t.of_index(0) is t.of_index(1) and t.get(media_id("c", "b")).index == 2


def test_options_and_bind():
    assert ServeOptions().is_loopback and not ServeOptions(host="0.0.0.0").is_loopback
    for kw in ({"port": 70000}, {"port": -1}, {"k": 0}, {"k": 5, "max_k": 4}, {"thumb_cache_mb": float("nan")}):
        with pytest.raises(ValueError):
            ServeOptions(**kw)
    sock = bind("127.0.0.1", 0)
    try:
        with pytest.raises(ValueError, match="cannot listen"):
            bind("127.0.0.1", sock.getsockname()[1])
    finally:
        sock.close()


def test_server_socket_is_tcp():
    """asyncio sets TCP_NODELAY only on a socket whose proto is TCP; without it every keep-alive
    response waits for the client's delayed ACK (~40 ms)."""
    sock = bind("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
    finally:
        sock.close()


def test_command_warns_off_loopback(files, monkeypatch):
    from click.testing import CliRunner

    import diffret.pipeline.search as search
    import diffret.pipeline.serve.server as server
    from diffret.pipeline.cli import main

    served = []
    real_bind = server.bind
    monkeypatch.setattr(search, "Searcher", lambda caches, **kw: FakeSearcher(files["videos"]))
    monkeypatch.setattr(server, "bind", lambda host, port: real_bind("127.0.0.1", 0))  # never bind 0.0.0.0 in a test
    monkeypatch.setattr(server, "serve", lambda app, sock: served.append(app) or sock.close())
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # the command's; not for the rest of the session
    monkeypatch.setattr(sys, "setswitchinterval", lambda s: None)
    r = CliRunner().invoke(main, ["serve", "--cache", str(files["dir"]), "--host", "0.0.0.0"])
    assert r.exit_code == 0, r.output
    assert "anyone who can reach this machine" in r.output and len(served) == 1
    assert "serving 6 videos from 1 cache(s) (2 without a readable video file: placeholders) at http://127.0.0.1:" in r.output
    r = CliRunner().invoke(main, ["serve", "--cache", str(files["dir"])])
    assert r.exit_code == 0 and "anyone" not in r.output
    for bad in (["--port", "70000"], ["--k", "0"], ["--max-k", "5", "--k", "9"]):
        r = CliRunner().invoke(main, ["serve", "--cache", str(files["dir"]), *bad])
        assert r.exit_code != 0 and "Error:" in r.output and "Traceback" not in r.output, bad


def test_concurrent_searches_share_batches(files):
    from concurrent.futures import ThreadPoolExecutor

    searcher = FakeSearcher(files["videos"])
    searcher.delay = 0.5
    queries = ["red circle", "missing", "moved", "nopath", "linked red", "bad", "secret"] * 2
    app = create_app(searcher, ServeOptions(k=2, max_k=6))
    with serve_in_thread(app) as url:
        with ThreadPoolExecutor(len(queries)) as pool:
            replies = list(pool.map(lambda q: get(url, "/api/search?q=" + quote(q) + "&k=" + str(1 + len(q) % 3)),
                                    queries))
    batcher = app.state.service.batcher
    assert batcher.queries == len(queries) and batcher.batches <= len(queries) // 2  # batched (the first runs alone)
    expected = FakeSearcher(files["videos"])
    for q, r in zip(queries, replies):
        if q == "bad":  # its SearchError reaches only its own request
            assert r.status == 400 and r.json()["error"] == "a bad query"
            continue
        assert r.status == 200, (q, r.text)
        body = r.json()
        assert body["query"] == q and len(body["hits"]) == 1 + len(q) % 3  # each its own k
        assert [h["video_id"] for h in body["hits"]] == [h["video_id"] for h in expected.search(q, k=6)][:len(body["hits"])]


def test_candidates_reach_the_searcher(files):
    from diffret.pipeline.serve.config import ALL

    for option, expected in ((None, None), (ALL, 6), (3, 3)):
        searcher = FakeSearcher(files["videos"])
        with serve_in_thread(create_app(searcher, ServeOptions(k=2, max_k=6, candidates=option))) as url:
            assert get(url, "/api/search?q=red").status == 200
        assert searcher.last_candidates == expected

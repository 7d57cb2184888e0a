"""The agent extensions in-process (local backend, real kernels): errors, limits, OpenAPI, no regressions."""

from __future__ import annotations

from api_support import KEY_A, KEY_B, App, auth, check_error, running_app, stdout_of

from orchestrator import workspace
from orchestrator.schemas import FileListResponse, InterruptResponse


def test_timeout_in_the_body_is_capped_by_the_server_maximum() -> None:
    with running_app(execute_timeout_seconds=1, max_execute_timeout_seconds=1.5) as app:
        response = app.client.post(
            "/tci/execute", json={"code": "import time; time.sleep(20)", "timeout": 100}, headers=auth(KEY_A)
        )
        assert response.status_code == 200, response.text
        data = response.json()["data"]
        assert data["outcome"] == "timeout"
        assert "the 1.5 s time limit" in "".join(o["data"] for o in data["outputs"] if o["type"] == "error")


def test_interrupt_and_file_routes_answer_in_the_envelope(app: App, victim: str) -> None:
    idle = app.client.post(f"/v1/tci/sessions/{victim}/interrupt", headers=auth(KEY_A))
    assert InterruptResponse.model_validate(idle.json()).data.interrupted is False
    put = app.client.put(f"/tci/sessions/{victim}/files/sub/x.txt", content=b"abc", headers=auth(KEY_A))
    assert put.json() == {"data": {"path": "sub/x.txt", "size": 3}, "errors": None}
    listing = FileListResponse.model_validate(
        app.client.get(f"/tci/sessions/{victim}/files", params={"path": "sub"}, headers=auth(KEY_A)).json()
    )
    assert [(e.path, e.type, e.size) for e in listing.data.entries] == [("sub/x.txt", "file", 3)]
    assert stdout_of(app.execute(KEY_A, "print(open('sub/x.txt').read())", victim)) == "abc\n"
    download = app.client.get(f"/tci/sessions/{victim}/files/sub/x.txt", headers=auth(KEY_A))
    assert (download.content, download.headers["content-type"]) == (b"abc", "text/plain; charset=utf-8")
    check_error(app.client.get(f"/tci/sessions/{victim}/files/nope", headers=auth(KEY_A)), 404, "file_not_found")
    check_error(
        app.client.get(f"/tci/sessions/{victim}/files", params={"path": "../.."}, headers=auth(KEY_A)),
        400,
        "invalid_file",
        "path",
    )
    for method in ("get", "put", "delete"):
        response = app.client.request(method.upper(), f"/tci/sessions/{victim}/files/sub/x.txt", headers=auth(KEY_B))
        check_error(response, 404, "session_not_found")
    check_error(app.client.post(f"/tci/sessions/{victim}/interrupt", headers=auth(KEY_B)), 404, "session_not_found")
    check_error(app.client.post(f"/tci/sessions/{victim}/interrupt"), 401, "invalid_api_key")
    assert app.client.delete(f"/tci/sessions/{victim}/files/sub", headers=auth(KEY_A)).status_code == 204


def test_a_streaming_request_refused_before_the_code_starts_is_plain_json(app: App) -> None:
    headers = {**auth(KEY_A), "Accept": "text/event-stream"}
    check_error(app.client.post("/tci/execute", json={"code": 1}, headers=headers), 422, "invalid_request")
    unknown = {"code": "1", "session_id": "ses_unknownunknownunknown"}
    check_error(app.client.post("/tci/execute", json=unknown, headers=headers), 404, "session_not_found")
    check_error(app.client.post("/mcp", json={}), 401, "invalid_api_key")


def test_a_streamed_execute_ends_with_the_json_body(app: App, victim: str) -> None:
    headers = {**auth(KEY_A), "Accept": "text/event-stream"}
    response = app.client.post("/tci/execute", json={"code": "print('s')\n5", "session_id": victim}, headers=headers)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [block for block in response.text.split("\n\n") if block.startswith("event: ")]
    assert events[0] == 'event: output\ndata: {"type":"stdout","data":"s\\n"}'
    assert events[-1].startswith('event: result\ndata: {"data":{"session_id":"' + victim)


def test_openapi_documents_every_new_route_with_examples(app: App) -> None:
    spec = app.client.get("/openapi.json").json()
    paths = spec["paths"]
    for prefix in ("", "/v1"):
        assert "post" in paths[f"{prefix}/tci/sessions/{{session_id}}/interrupt"]
        assert {"get", "put", "delete"} <= set(paths[f"{prefix}/tci/sessions/{{session_id}}/files/{{path}}"])
        assert "get" in paths[f"{prefix}/tci/sessions/{{session_id}}/files"]
        execute = paths[f"{prefix}/tci/execute"]["post"]
        assert "example" in execute["responses"]["200"]["content"]["text/event-stream"]
        assert execute["requestBody"]["content"]["application/json"]["examples"]
    assert "/playground" in paths
    assert "timeout" in spec["components"]["schemas"]["ExecuteRequest"]["properties"]
    assert app.client.get("/playground").status_code == 200


def test_mcp_answers_under_v1_too_and_refuses_get_and_delete(app: App) -> None:
    headers = {**auth(KEY_A), "Accept": "application/json, text/event-stream"}
    listed = app.client.post("/v1/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"}, headers=headers)
    assert "execute_code" in {tool["name"] for tool in listed.json()["result"]["tools"]}
    # A stateless server pushes nothing: a GET's event stream stayed open and silent until shutdown.
    for method in ("GET", "DELETE"):
        response = app.client.request(method, "/mcp", headers=headers)
        check_error(response, 405, "http_error")
        assert response.headers["allow"] == "POST"


def test_a_file_named_with_a_newline_is_reachable(app: App, victim: str) -> None:
    """Listed, so it can be downloaded, replaced and deleted too (the route once stopped at the newline)."""
    assert stdout_of(app.execute(KEY_A, "open('new\\nline.txt', 'w').write('one')\nprint('ok')", victim)) == "ok\n"
    listed = app.client.get(f"/tci/sessions/{victim}/files", headers=auth(KEY_A)).json()["data"]["entries"]
    assert "new\nline.txt" in {entry["path"] for entry in listed}
    route = f"/v1/tci/sessions/{victim}/files/new%0Aline.txt"
    assert app.client.put(route, content=b"two", headers=auth(KEY_A)).status_code == 200
    download = app.client.get(route, headers=auth(KEY_A))
    assert download.content == b"two"
    assert download.headers["content-disposition"].startswith('attachment; filename="new_line.txt"; ')
    assert app.client.delete(route, headers=auth(KEY_A)).status_code == 204
    assert stdout_of(app.execute(KEY_A, "import os\nprint(os.path.exists('new\\nline.txt'))", victim)) == "False\n"


def test_a_download_type_comes_from_the_extension_alone(app: App, victim: str) -> None:
    """A name read as a data URL chose the type (HTML served as such), or put a line break in the header."""
    code = "import os\nos.makedirs('data:text')\nopen('data:text/html,x.txt', 'w').write('<b>')\nprint('ok')"
    assert stdout_of(app.execute(KEY_A, code, victim)) == "ok\n"
    download = app.client.get(f"/tci/sessions/{victim}/files/data:text/html,x.txt", headers=auth(KEY_A))
    assert download.headers["content-type"] == "text/plain; charset=utf-8"
    assert workspace.media_type("data:image/png\r\nX-Evil: 1,abc") == "application/octet-stream"
    assert workspace.media_type("plots/figure.PNG") == "image/png"

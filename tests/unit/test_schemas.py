from orchestrator.models import ExecuteResult, SessionView
from orchestrator.schemas import ExecuteResponse, SessionListResponse, render_execute, render_sessions, rfc3339


def test_execute_body_validates_as_the_sdk_expects():
    result = ExecuteResult(
        session_id="ses_abc",
        outputs=[
            {"type": "stdout", "data": "hi\n"},
            {"type": "display_data", "data": {"image/png": "iVBOR", "text/plain": "<Figure>"}},
            {"type": "error", "data": "Traceback...\nZeroDivisionError: division by zero"},
        ],
        error_summary="ZeroDivisionError: division by zero",
        outcome="error",
    )
    body = render_execute(result)
    parsed = ExecuteResponse.model_validate(body)
    assert parsed.data.status == "success"
    assert body["errors"] is None
    assert body["data"]["errors"] == "ZeroDivisionError: division by zero"


def test_no_error_output_means_no_data_errors():
    body = render_execute(ExecuteResult(session_id="ses_abc", outputs=[], error_summary="stale"))
    assert body["data"]["errors"] is None


def test_session_list_uses_rfc3339_and_never_null():
    view = SessionView("ses_abc", 2, 1_700_000_000.5, 1_700_000_000.5, 1_700_003_600.5)
    body = render_sessions([view])
    SessionListResponse.model_validate(body)
    [item] = body["data"]["sessions"]
    assert item["started_at"] == "2023-11-14T22:13:20.500000Z"
    assert item["last_execute_at"]
    assert item["expires_at"].endswith("Z")
    assert rfc3339(0) == "1970-01-01T00:00:00Z"

import pytest

from orchestrator import errors


def _tree(cls: type[errors.OrchestratorError]) -> list[type[errors.OrchestratorError]]:
    return [cls, *(sub for child in cls.__subclasses__() for sub in _tree(child))]


@pytest.mark.parametrize("cls", _tree(errors.OrchestratorError), ids=lambda cls: cls.__name__)
def test_only_capacity_errors_invite_a_retry(cls):
    # The SDKs retry what we let them; a retried execute would run the user's code again.
    # 504 is the capacity answer of the SandboxFusion routes (nothing ran either).
    assert cls.retry is (cls.status_code in {429, 504})
    assert isinstance(cls.code, str)
    assert cls.code


def test_lookup_and_value_errors_subclass_the_builtins():
    assert issubclass(errors.SessionNotFound, LookupError)
    assert issubclass(errors.InvalidRequest, ValueError)
    assert errors.RequestTooLarge.status_code == 413

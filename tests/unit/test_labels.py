from orchestrator.backends import labels
from orchestrator.models import Claim, looks_like_session_id, new_session_id


def test_claim_round_trips_through_the_container_name():
    claim = Claim(new_session_id(), "team-a", 1_700_000_000.123, 1_700_003_600.123)
    name = labels.claimed_name("prod", claim)
    parsed = labels.parse_claim(name)
    assert parsed == claim
    assert labels.parse_claim("/" + name) == claim  # the engine reports names with a leading slash
    # A run lane's claim says so: a restarted server removes it instead of listing it as a session.
    held = Claim(new_session_id(), "team-a", 1_700_000_000.123, 1_700_003_600.123, listed=False)
    assert labels.parse_claim(labels.claimed_name("prod", held)) == held


def test_unclaimed_and_foreign_names_carry_no_claim():
    assert labels.parse_claim(labels.pool_name("prod")) is None
    assert labels.parse_claim("postgres") is None
    assert labels.parse_claim("tci.prod.ses_x.team.1.2.extra") is None


def test_labels_select_one_instance():
    made = labels.make_labels("prod", "abc", 10.9, test_run="run1")
    assert made == {
        labels.MANAGED: "true",
        labels.INSTANCE: "prod",
        labels.PROFILE: "abc",
        labels.CREATED: "10",
        labels.TEST_RUN: "run1",
    }
    assert labels.selector("prod") == [f"{labels.MANAGED}=true", f"{labels.INSTANCE}=prod"]


def test_session_ids_are_long_random_and_checked():
    ids = {new_session_id() for _ in range(1000)}
    assert len(ids) == 1000
    sample = next(iter(ids))
    assert sample.startswith("ses_")
    assert len(sample) == 26
    assert looks_like_session_id(sample)
    for bad in ("ses_", "ses_../../x", "abc", "ses_" + "a" * 100, "ses_ab cd1234"):
        assert not looks_like_session_id(bad)


def test_only_a_warm_sandboxs_own_name_is_a_pool_name():
    warm = labels.pool_name("inst")
    assert labels.is_pool_name(warm)
    assert labels.is_pool_name("/" + warm)
    # A claim interrupted between its renames leaves this; the sandbox may hold a session's state.
    assert not labels.is_pool_name(warm + ".taken")
    claimed = labels.claimed_name("inst", Claim("ses_abc", "team", 1.0, 2.0))
    assert not labels.is_pool_name(claimed)

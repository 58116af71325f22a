"""Every hostile input of the corpus is refused for its own reason: exit 1 or 2, one clear message
naming that reason, no traceback, no hang, nothing written."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from kwanzaa_adapter import cli

from .corpus import HostileCase, build_corpus, snapshot

TIME_BOX_S = 60


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[HostileCase]]:
    root = tmp_path_factory.mktemp("hostile")
    return root, build_corpus(root)


def test_corpus_covers_every_kind_with_at_least_sixty_cases(corpus):
    _, cases = corpus
    kinds = {case.kind for case in cases}
    assert len(cases) >= 60 and kinds == {"config", "data", "artifact", "model"}
    assert len({case.name for case in cases}) == len(cases)
    assert [case.name for case in cases if not case.reason.strip()] == []


def _timeout(signum, frame):
    raise TimeoutError(f"no answer within {TIME_BOX_S} s")


def test_every_hostile_input_is_refused_cleanly_for_its_own_reason(corpus, capsys):
    root, cases = corpus
    failures = []
    for case in cases:
        case_dir = root / case.name
        before = snapshot(case_dir)
        previous = signal.signal(signal.SIGALRM, _timeout)
        signal.alarm(TIME_BOX_S)
        try:
            code = cli.main(list(case.argv))
        except BaseException as exc:  # noqa: BLE001 - the point is that nothing escapes
            code = f"raised {type(exc).__name__}: {exc}"
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
        out, err = capsys.readouterr()
        message = (err or out).strip()
        if code != case.expected_exit:
            failures.append(f"{case.name}: exit {code!r}, expected {case.expected_exit}; {message[:300]!r}")
        elif "Traceback" in out + err:
            failures.append(f"{case.name}: traceback printed")
        elif not message or len(message) > 4000:
            failures.append(f"{case.name}: no clear message ({len(message)} characters: {message[:200]!r})")
        elif not case.gives_reason(message):
            failures.append(f"{case.name}: refused, but not for {case.reason!r}: {message[:300]!r}")
        elif snapshot(case_dir) != before:
            failures.append(f"{case.name}: files written {sorted(set(snapshot(case_dir)) - set(before))}")
    assert not failures, "\n".join(failures)

"""The count of each tenant's unread answers (``transport/grpc/unread.py``): a tenant
is refused only once what it holds reaches the bound (an answer alone never is), each
refusal is counted, other tenants are not touched, and what is written is forgotten."""

from __future__ import annotations

import pytest

from mandant.transport.grpc.unread import UNREAD_REASON, AnswersUnread, UnreadAnswers
from tests.fakes import RecordingObserver


def test_a_tenant_is_refused_only_at_the_bound_and_alone() -> None:
    observer = RecordingObserver()
    unread = UnreadAnswers(100, observer)
    unread.check("acme")  # nothing held
    unread.hold("acme", 250)  # one answer larger than the bound is held all the same
    with pytest.raises(AnswersUnread) as refused:
        unread.check("acme")
    assert refused.value.retry_after_s == 1.0
    assert "250 bytes of this tenant's answers are not read yet" in str(refused.value)
    unread.check("globex")  # another tenant's calls go on
    assert observer.rejections == [("acme", UNREAD_REASON, "")]


def test_written_answers_are_forgotten() -> None:
    unread = UnreadAnswers(100, RecordingObserver())
    unread.hold("acme", 60)
    unread.hold("acme", 60)
    with pytest.raises(AnswersUnread):
        unread.check("acme")
    unread.release("acme", 60)
    assert unread.held("acme") == 60
    unread.check("acme")  # below the bound again
    unread.release("acme", 60)
    assert unread.held("acme") == 0
    unread.hold("acme", 0)  # an answer without tensors holds nothing
    assert unread.held("acme") == 0

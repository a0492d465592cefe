from dataclasses import dataclass

from bot.prompt import SAFETY_MARGIN_TOKENS, Budget, build_prompt, select_newest


@dataclass(frozen=True)
class Msg:
    role: str
    text: str
    tokens: int


def count(role: str, text: str) -> int:
    """One token per character plus two for the template: easy to reason about."""
    return len(text) + 2


def truncate(text: str, max_tokens: int) -> str:
    return text[:max_tokens]


def history(n: int, size: int = 8) -> list[Msg]:
    """n messages of ``size`` tokens, newest first, texts h<n-1> … h0."""
    return [Msg("user" if i % 2 else "assistant", f"h{i}", size) for i in reversed(range(n))]


def budget(context: int = 100, reply: int = 30, overhead: int = 2) -> Budget:
    return Budget(context_tokens=context, reply_tokens=reply, overhead_tokens=overhead)


def test_everything_fits_in_order() -> None:
    prompt = build_prompt(system="sys", user_text="hi", history=history(3), budget=budget(),
                          count=count, truncate=truncate)
    assert [m.content for m in prompt.messages] == ["sys", "h0", "h1", "h2", "hi"]
    assert prompt.history_used == 3
    assert not prompt.input_truncated
    assert prompt.tokens == count("system", "sys") + count("user", "hi") + 3 * 8 + 2


def test_keeps_the_newest_and_reserves_reply_room() -> None:
    b = budget(context=100, reply=30, overhead=2)
    prompt = build_prompt(system="sys", user_text="hi", history=history(50), budget=b,
                          count=count, truncate=truncate)
    contents = [m.content for m in prompt.messages]
    room = 100 - 30 - 2 - SAFETY_MARGIN_TOKENS - count("system", "sys") - count("user", "hi")
    assert prompt.history_used == room // 8
    # The newest ones, contiguous, oldest first.
    assert contents[1:-1] == [f"h{i}" for i in range(50 - room // 8, 50)]
    assert prompt.tokens + b.reply_tokens <= b.context_tokens


def test_system_prompt_is_never_dropped() -> None:
    big_system = "s" * 40
    prompt = build_prompt(system=big_system, user_text="u" * 500, history=history(10),
                          budget=budget(), count=count, truncate=truncate)
    assert prompt.messages[0].role == "system"
    assert prompt.messages[0].content == big_system
    assert prompt.history_used == 0


def test_oversized_input_is_cut_to_fit_and_flagged() -> None:
    b = budget(context=100, reply=30)
    prompt = build_prompt(system="sys", user_text="x" * 1000, history=history(5), budget=b,
                          count=count, truncate=truncate)
    assert prompt.input_truncated
    user = prompt.messages[-1]
    assert user.role == "user" and 0 < len(user.content) < 1000
    assert prompt.tokens + b.reply_tokens <= b.context_tokens


def test_selection_stops_at_the_first_message_that_does_not_fit() -> None:
    newest_first = [Msg("user", "a", 5), Msg("assistant", "big", 50), Msg("user", "c", 1)]
    assert [m.text for m in select_newest(newest_first, 20)] == ["a"]
    assert [m.text for m in select_newest(newest_first, 56)] == ["c", "big", "a"]


def test_stop_string_prefixes_are_held_back() -> None:
    from bot.generators.base import held_back

    assert held_back("the capital of F", ("France",)) == 1
    assert held_back("the capital of Fra", ("France", "Fr")) == 3
    assert held_back("nothing here", ("France",)) == 0
    assert held_back("abc", ()) == 0

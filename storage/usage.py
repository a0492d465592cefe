"""Usage: the per-user, per-day counts a reply adds to, and the figures read from them."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date, datetime

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from bot.store import NewReply, Role, Stats
from storage.models import ConversationRow, MessageRow, UsageRow, UserRow

STATS_LATENCY_SAMPLE = 1000


async def count_usage(session: AsyncSession, reply: NewReply) -> None:
    """Add a stored reply to its author's counts for today, in the reply's transaction."""
    today = datetime.now(UTC).date()
    usage = await session.scalar(select(UsageRow).where(
        UsageRow.platform == reply.platform,
        UsageRow.user_id == reply.author_id,
        UsageRow.conversation_id == reply.conversation_id,
        UsageRow.day == today,
    ))
    if usage is None:
        usage = UsageRow(platform=reply.platform, user_id=reply.author_id,
                         conversation_id=reply.conversation_id, day=today,
                         messages=0, prompt_tokens=0, reply_tokens=0)
        session.add(usage)
    usage.messages += 1
    usage.prompt_tokens += reply.prompt_tokens
    usage.reply_tokens += reply.tokens


async def reply_tokens_on(session: AsyncSession, platform: str, user_id: str,
                          day: date) -> int:
    """Reply tokens a user was given on a day, in every conversation (the daily quota)."""
    total = await session.scalar(
        select(func.coalesce(func.sum(UsageRow.reply_tokens), 0))
        .where(UsageRow.platform == platform, UsageRow.user_id == user_id,
               UsageRow.day == day))
    return int(total or 0)


async def read_stats(session: AsyncSession) -> Stats:
    conversations = await session.scalar(select(func.count(ConversationRow.id)))
    users = await session.scalar(select(func.count(UserRow.id)))
    counts: dict[str, int] = {
        role: count for role, count in await session.execute(
            select(MessageRow.role, func.count(MessageRow.id)).group_by(MessageRow.role)
        )
    }
    prompt_tokens, reply_tokens = (await session.execute(
        select(func.coalesce(func.sum(UsageRow.prompt_tokens), 0),
               func.coalesce(func.sum(UsageRow.reply_tokens), 0))
    )).one()
    latencies = (await session.scalars(
        select(MessageRow.generation_ms)
        .where(MessageRow.role == Role.ASSISTANT.value,
               MessageRow.generation_ms.is_not(None))
        .order_by(MessageRow.id.desc())
        .limit(STATS_LATENCY_SAMPLE)
    )).all()
    values = sorted(v for v in latencies if v is not None)
    return Stats(
        conversations=conversations or 0,
        users=users or 0,
        user_messages=counts.get(Role.USER.value, 0),
        replies=counts.get(Role.ASSISTANT.value, 0),
        prompt_tokens=int(prompt_tokens),
        reply_tokens=int(reply_tokens),
        latency_ms_p50=_percentile(values, 0.5),
        latency_ms_p95=_percentile(values, 0.95),
    )


def _percentile(sorted_values: Sequence[int], fraction: float) -> float | None:
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, round(fraction * (len(sorted_values) - 1)))
    return float(sorted_values[index])

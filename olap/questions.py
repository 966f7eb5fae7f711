"""The design's analyst questions as SQL: the one copy that docs/analysts.md shows (between its
`<!-- questions:begin -->` and `<!-- questions:end -->` markers), tests/test_analyst_questions.py runs through
the ClickHouse-compatible endpoint and `tally sql`, and `python -m bench.analyst` times on 10 M events.

Each query is what an analyst types: plain analyst SQL over `tally.events`, `tally.sites` and `tally.countries`,
no parameters (their inputs, such as 'Europe', are literals to edit). Time words are fixed here and in the docs:

- "last quarter": the last 90 days up to now (a rolling quarter), not the previous calendar quarter;
- "last week": the last 7 days up to now;
- "yesterday": the previous calendar day in UTC;
- a "day" of the per-domain-day average is a UTC day (`toDate(ts)`; ts is UTC).

`markdown()` renders the docs section; `sql_for(question, database)` is the query for another database name
(the tests use one of their own, so other tests' events cannot change the answers).
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Question:
    name: str  # identifier: test ids, bench rows
    title: str  # the design's question
    meaning: str  # how the words are read (one paragraph of the docs)
    sql: str


QUESTIONS: tuple[Question, ...] = (
    Question(
        "revenue_by_account",
        "Total revenue by account for the last quarter",
        "Revenue is the sum of `value` over every event type; the last quarter is the last 90 days up to now "
        "(for the previous calendar quarter use `e.ts >= toStartOfQuarter(now()) - INTERVAL 1 QUARTER AND "
        "e.ts < toStartOfQuarter(now())`). An account whose sites had no valued event shows 0.",
        """SELECT s.account AS account, coalesce(sum(e.value), 0) AS revenue
FROM tally.events AS e
INNER JOIN tally.sites AS s ON e.domain = s.domain
WHERE e.ts >= now() - INTERVAL 90 DAY
GROUP BY account
ORDER BY revenue DESC, account""",
    ),
    Question(
        "impressions_from_europe",
        "Total impressions by all customers from Europe",
        "All time, every site; the country is the visitor's (from the client address), its continent from "
        "`tally.countries`. Events without a country are not counted.",
        """SELECT count() AS impressions
FROM tally.events AS e
INNER JOIN tally.countries AS c ON e.country = c.code
WHERE e.type = 'impression' AND c.continent = 'Europe'""",
    ),
    Question(
        "avg_impressions_per_browser",
        "Average impressions per browser (per domain-day)",
        "For each browser: its impressions on one domain in one UTC day, averaged over the domain-days on which "
        "that browser had at least one impression (a day without any is not a zero). `browser` is NULL for an "
        "agent that was not recognised.",
        """SELECT browser, avg(impressions) AS avg_impressions, count() AS domain_days
FROM (
    SELECT e.browser AS browser, e.domain AS domain, toDate(e.ts) AS day, count() AS impressions
    FROM tally.events AS e
    WHERE e.type = 'impression'
    GROUP BY browser, domain, day
)
GROUP BY browser
ORDER BY avg_impressions DESC, browser""",
    ),
    Question(
        "impressions_last_week",
        "Total impressions by all domains for last week",
        "One total over every domain; last week is the last 7 days up to now (`domains`: how many had any).",
        """SELECT count() AS impressions, uniqExact(e.domain) AS domains
FROM tally.events AS e
WHERE e.type = 'impression' AND e.ts >= now() - INTERVAL 7 DAY""",
    ),
    Question(
        "top_pages_yesterday",
        "Top 10 pages across all sites by unique visitors yesterday",
        "A page is a path on one site (`domain`, `page`); yesterday is the previous calendar day in UTC; unique "
        "visitors are exact (`uniqExact(visitor)`; the visitor key rotates daily, so a day is its natural span). "
        "Bots are not visitors (as on the dashboard): they have a visitor key too, so they are left out by "
        "`device`. Ties are broken by domain, then page.",
        """SELECT e.domain AS domain, e.page AS page, uniqExact(e.visitor) AS visitors
FROM tally.events AS e
WHERE toDate(e.ts) = toDate(now('UTC')) - 1 AND coalesce(e.device, '') != 'bot'
GROUP BY domain, page
ORDER BY visitors DESC, domain, page
LIMIT 10""",
    ),
)

BY_NAME = {q.name: q for q in QUESTIONS}
_TABLE = re.compile(r"\btally\.(events|sites|countries)\b")


def sql_for(question: Question, database: str) -> str:
    """The question's query over `database` instead of `tally` (the same text when database is 'tally')."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", database):
        raise ValueError(f"{database!r} is not a database identifier")
    return _TABLE.sub(lambda m: f"{database}.{m.group(1)}", question.sql)


def markdown() -> str:
    """The "Example questions" section of docs/analysts.md, between its markers (exactly; a test compares)."""
    parts = ["These are the design's analyst questions, as tested (tests/test_analyst_questions.py) and timed on "
             "10 M events (`python -m bench.analyst`). They come from one file, olap/questions.py; the time words "
             "are read as each one says. Paste them into any client; `tally sql -f` reads one from a file."]
    for q in QUESTIONS:
        parts.append(f"### {q.title}\n\n{q.meaning}\n\n```sql\n{q.sql}\n```")
    return "\n\n".join(parts) + "\n"

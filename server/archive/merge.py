"""Joining a dialog's hot page (from its shard) with its archived page (from the files): pure.

Each source returns its first messages beyond the cursor in the page's order, and whether it has
more. The joined page holds each message once (a message archived but not yet deleted from its
shard comes from both) and only messages that are certainly next: none beyond the last message of
a source that has more, since that source's next messages could come first.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from server.archive.files import PageRow


def merge_pages(
    hot: Sequence[PageRow],
    hot_more: bool,
    cold: Sequence[PageRow],
    cold_more: bool,
    *,
    oldest_first: bool,
    limit: int,
    max_bytes: int,
    overhead: int,
    deleted: Collection[str] = (),
) -> tuple[list[PageRow], bool, str | None]:
    """The page's messages (at most `limit`, within `max_bytes` counting each as its text's UTF-8
    bytes + `overhead`, at least one unless all of them were `deleted`), whether more follow, and
    the id the next page continues after (the last one shown or passed over as deleted)."""
    by_id = {row[0]: row for row in cold}
    by_id.update((row[0], row) for row in hot)
    # Canonical UUID text sorts as the ids' bytes do.
    joined = sorted(by_id.values(), key=lambda row: row[0], reverse=not oldest_first)
    horizons = [rows[-1][0] for rows, more in ((hot, hot_more), (cold, cold_more)) if more and rows]
    if horizons:
        horizon = min(horizons) if oldest_first else max(horizons)
        joined = [row for row in joined if (row[0] <= horizon if oldest_first else row[0] >= horizon)]
    more = hot_more or cold_more
    page: list[PageRow] = []
    used = 0
    resume_after: str | None = None
    for row in joined:
        if row[0] in deleted:
            resume_after = row[0]
            continue
        size = len(row[3].encode()) + overhead
        if len(page) == limit or (page and used + size > max_bytes):
            return page, True, resume_after
        page.append(row)
        used += size
        resume_after = row[0]
    return page, more, resume_after

"""RFC 9111's rules as this proxy applies them, as a private cache of each credential: what may
be stored, how fresh it is and how old, which variant a request selects, how a 304 refreshes an
entry, and when a client's own conditional request is answered 304.

hishel's sans-IO state machine decides what it decides well and is used for it: whether an
answer may be stored and which of its header fields are kept (`CacheMiss`, RFC 9111 §3 and
§3.1), and whether a 304 selects the stored answer and how its fields are merged
(`NeedRevalidation`, §4.3.4 and §3.2). Those decisions need only the status and the header
fields, so they fit a proxy that streams the body on. The rest is written here because
hishel's look-up state (`IdleClient`) does not do what this cache must:
- its freshness falls back to a heuristic (10 % of the time since Last-Modified) that cannot
  be turned off, while an answer here is fresh only by max-age or Expires (Battle.net's token
  price carries Last-Modified and must not be served stale for minutes);
- its Age is now minus Date, where §4.2.3 also counts the Age header received, the response
  delay and the time resident in the cache; and it reads time.time() itself (no clock to
  inject);
- it parses Cache-Control again and scans every stored variant on every look-up, where a hit
  here must cost a dictionary look-up and a few comparisons;
- it never answers a client's own If-None-Match or If-Modified-Since (§4.3.2), nor honours a
  request's max-age, min-fresh or only-if-cached.
Its Headers lower-case every name and lose the order; hishel's decisions are applied here to
the header fields as upstream sent them."""

from __future__ import annotations

import calendar
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_tz
from uuid import uuid4

import hishel
from aiohttp import hdrs
from multidict import CIMultiDict, CIMultiDictProxy

Items = Sequence[tuple[str, str]]
# The primary key of a stored answer: credential, method, the full upstream URL as forwarded.
Primary = tuple[str, str, str]
# The request header fields an answer's Vary names, and their values (None: absent).
Secondary = tuple[tuple[str, str | None], ...]
Fields = tuple[tuple[str, str], ...]

# hishel logs each decision at debug level, without saying for which request: one line per
# miss that X-Cache and the access line already tell better.
logging.getLogger("hishel").setLevel(logging.INFO)

_PRIVATE: hishel.CacheOptions = {"shared": False, "supported_methods": ["GET", "HEAD"]}
# A cache directive: a token, optionally `=` a token or a quoted string (RFC 9111 §5.2).
_DIRECTIVE = re.compile(r"""([!#$%&'*+.^_`|~0-9A-Za-z-]+)(?:\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*))?""")
_AROUND_COMMAS = re.compile(r"\s*,\s*")
# Vary names these and still matches: Authorization is the proxy's own token, one per
# credential (a team key never reaches upstream), and Host is the route's upstream host.
_SAME_WITHIN_CREDENTIAL = frozenset({"authorization", "host"})
# Set-Cookie belongs to the client that got it; the cache is shared by the team.
_NEVER_STORED = frozenset({"set-cookie"})
# Preconditions the cache does not evaluate for a client (with a Range: partial answers).
# aiohttp's names are istr: a look-up with one skips folding the name's case on every request.
_RANGE, _IF_RANGE, _IF_MATCH, _IF_UNMODIFIED_SINCE = (
    hdrs.RANGE,
    hdrs.IF_RANGE,
    hdrs.IF_MATCH,
    hdrs.IF_UNMODIFIED_SINCE,
)
# What a 304 to a client carries of the answer it stands for (RFC 9110 §15.4.5).
_NOT_MODIFIED_FIELDS = frozenset(
    {"cache-control", "content-location", "date", "etag", "expires", "last-modified", "vary"}
)
ENTRY_OVERHEAD = 1000  # bytes an entry costs beyond its body and fields (objects, key, index)
FIELD_OVERHEAD = 250  # bytes a stored field costs beyond its text (str, tuple, answer_fields)


def directives(values: Iterable[str]) -> dict[str, str | None]:
    """Cache-Control directives by lower-case name (the first of repeats); a value is
    unquoted, a directive without one maps to None."""
    found: dict[str, str | None] = {}
    for value in values:
        for match in _DIRECTIVE.finditer(value):
            name = match.group(1).lower()
            if name in found:
                continue
            argument = match.group(2)
            if argument is not None and argument.startswith('"'):
                argument = argument[1:-1].replace("\\", "")
            found[name] = argument
    return found


def seconds(argument: str | None) -> int | None:
    """A delta-seconds argument, or None when missing or malformed."""
    if argument is None or not argument.isdigit():
        return None
    return int(argument)


def http_date(value: str | None) -> float | None:
    """An HTTP-date as epoch seconds, or None when it is not one."""
    if not value:
        return None
    try:
        parts = parsedate_tz(value)
        return None if parts is None else float(calendar.timegm(parts[:6]) - (parts[9] or 0))
    except (ValueError, OverflowError, IndexError):
        return None


def first(items: Items, name: str) -> str | None:
    for key, value in items:
        if key.lower() == name:
            return value
    return None


def every(items: Items, name: str) -> list[str]:
    return [value for key, value in items if key.lower() == name]


def normalized(values: list[str]) -> str | None:
    """A request field's value for comparing variants: lines combined and white space
    around commas dropped (RFC 9111 §4.1)."""
    if not values:
        return None
    return _AROUND_COMMAS.sub(",", ",".join(values).strip())


def vary_names(items: Items) -> tuple[str, ...] | None:
    """The request fields an answer varies on, lower case; None for `Vary: *` (never
    matches, so never stored)."""
    names: list[str] = []
    for value in every(items, "vary"):
        for part in value.split(","):
            name = part.strip().lower()
            if name == "*":
                return None
            if name and name not in _SAME_WITHIN_CREDENTIAL and name not in names:
                names.append(name)
    return tuple(names)


def secondary(names: tuple[str, ...], headers: CIMultiDictProxy[str]) -> Secondary:
    """The values of the fields `names` in a request: the variant it selects."""
    return tuple((name, normalized(headers.getall(name, []))) for name in names)


@dataclass(slots=True, eq=False)
class Entry:
    """One stored answer: its fields as upstream sent them (less those never stored), its body,
    and the times that make its age and freshness (epoch seconds of the cache's clock)."""

    primary: Primary
    vary: tuple[str, ...]
    key: Secondary
    status: int
    reason: str | None
    headers: tuple[tuple[str, str], ...]
    body: bytes
    response_time: float
    corrected_initial_age: float
    freshness_lifetime: float
    no_cache: bool
    etag: str | None
    last_modified: str | None
    size: int = field(init=False)
    # The stored fields as the answer's headers start: a hit copies them (a copy of a
    # multidict keeps its folded names) instead of folding every name again.
    answer_fields: CIMultiDict[str] = field(init=False)

    def __post_init__(self) -> None:
        fields = sum(len(name) + len(value) for name, value in self.headers)
        keys = sum(len(part) for part in self.primary) + sum(
            len(name) + len(value or "") for name, value in self.key
        )
        self.size = (
            len(self.body) + fields + keys + ENTRY_OVERHEAD + FIELD_OVERHEAD * len(self.headers)
        )
        self.answer_fields = CIMultiDict(self.headers)

    def age(self, now: float) -> float:
        """current_age of RFC 9111 §4.2.3."""
        return self.corrected_initial_age + max(0.0, now - self.response_time)

    @property
    def validated(self) -> bool:
        return self.etag is not None or self.last_modified is not None

    def matches(self, headers: CIMultiDictProxy[str]) -> bool:
        """Whether a request selects this variant (RFC 9111 §4.1)."""
        return all(normalized(headers.getall(name, [])) == value for name, value in self.key)


@dataclass(frozen=True, slots=True)
class Asked:
    """What a request says about the cache: its Cache-Control directives that matter here
    and its own validators."""

    no_store: bool = False
    no_cache: bool = False
    max_age: int | None = None
    min_fresh: int | None = None
    only_if_cached: bool = False
    if_none_match: str | None = None
    if_modified_since: str | None = None
    evaluates: bool = True  # False: it has a precondition or a range the cache leaves upstream

    @property
    def conditional(self) -> bool:
        return self.if_none_match is not None or self.if_modified_since is not None

    def accepts(self, entry: Entry, now: float) -> bool:
        """Whether `entry` may answer this request without validation (RFC 9111 §4.2 and the
        request directives of §5.2.1)."""
        return self.accepts_aged(entry, entry.age(now))

    def accepts_aged(self, entry: Entry, age: float) -> bool:
        """`accepts` for an entry whose current age is known (a hit says it in Age)."""
        if entry.no_cache or self.no_cache:
            return False
        left = entry.freshness_lifetime - age
        if left <= 0:
            return False
        if self.max_age is not None and age > self.max_age:
            return False
        return self.min_fresh is None or left >= self.min_fresh


PLAIN = Asked()


def asked(headers: CIMultiDictProxy[str]) -> Asked:
    """The request's view of the cache; PLAIN, allocated once, for a request that says
    nothing about it."""
    control = headers.getall(hdrs.CACHE_CONTROL, ())
    inm = headers.get(hdrs.IF_NONE_MATCH)
    ims = headers.get(hdrs.IF_MODIFIED_SINCE)
    evaluates = not (
        _RANGE in headers
        or _IF_RANGE in headers
        or _IF_MATCH in headers
        or _IF_UNMODIFIED_SINCE in headers
    )
    if not control and inm is None and ims is None and evaluates:
        return PLAIN
    found = directives(control)
    return Asked(
        no_store="no-store" in found,
        no_cache="no-cache" in found,
        max_age=seconds(found.get("max-age")) if "max-age" in found else None,
        min_fresh=seconds(found.get("min-fresh")) if "min-fresh" in found else None,
        only_if_cached="only-if-cached" in found,
        if_none_match=inm,
        if_modified_since=ims,
        evaluates=evaluates,
    )


def not_modified(asked: Asked, *, status: int, etag: str | None, last_modified: str | None) -> bool:
    """Whether a client's conditional GET or HEAD is answered 304 by an answer with this
    status and these validators (RFC 9110 §13.2.2: If-None-Match, by weak comparison, before
    If-Modified-Since)."""
    if status != 200:
        return False
    if asked.if_none_match is not None:
        if etag is None:
            return asked.if_none_match.strip() == "*"
        return _weak_match(asked.if_none_match, etag)
    since = http_date(asked.if_modified_since)
    modified = http_date(last_modified)
    return since is not None and modified is not None and modified <= since


def _weak_match(candidates: str, etag: str) -> bool:
    if candidates.strip() == "*":
        return True
    opaque = etag.strip().removeprefix("W/")
    return any(tag.strip().removeprefix("W/") == opaque for tag in candidates.split(","))


def not_modified_fields(entry_headers: Items) -> list[tuple[str, str]]:
    """The fields of a 304 that stands for a stored answer."""
    return [(name, value) for name, value in entry_headers if name.lower() in _NOT_MODIFIED_FIELDS]


def validators(entry: Entry) -> list[tuple[str, str]]:
    """The fields that make a request for `entry` conditional (RFC 9111 §4.3.1)."""
    fields = []
    if entry.etag is not None:
        fields.append(("If-None-Match", entry.etag))
    if entry.last_modified is not None:
        fields.append(("If-Modified-Since", entry.last_modified))
    return fields


def _hishel_headers(items: Items) -> hishel.Headers:
    lists: dict[str, list[str]] = {}
    for name, value in items:
        lists.setdefault(name.lower(), []).append(value)
    return hishel.Headers(lists)


def _kept(items: Items, kept: hishel.Headers) -> tuple[tuple[str, str], ...]:
    """`items` less the fields hishel left out, in upstream's order and spelling."""
    return tuple(
        (name, value)
        for name, value in items
        if name.lower() in kept and name.lower() not in _NEVER_STORED
    )


def storable(
    method: str, url: str, status: int, items: Items
) -> tuple[tuple[str, str], ...] | None:
    """The fields to store of an answer (hishel's §3 decision for a private cache), or None
    when it may not be stored or could never be reused: `Vary: *`, or neither explicit
    freshness nor a validator (no heuristic freshness here)."""
    if status in (206, 304) or vary_names(items) is None:
        return None
    state = hishel.CacheMiss(options=_PRIVATE, request=hishel.Request(method=method, url=url)).next(
        hishel.Response(status_code=status, headers=_hishel_headers(items))
    )
    if not isinstance(state, hishel.StoreAndUse):
        return None
    return _kept(items, state.response.headers)


def entry_of(
    *,
    primary: Primary,
    request_headers: CIMultiDictProxy[str],
    status: int,
    reason: str | None,
    fields: tuple[tuple[str, str], ...],
    body: bytes,
    request_time: float,
    response_time: float,
) -> Entry | None:
    """A stored answer from fields that `storable` kept, or None when it could never be
    reused without a full request (no explicit freshness and no validator)."""
    control = directives(every(fields, "cache-control"))
    names = vary_names(fields) or ()
    date = http_date(first(fields, "date"))
    date_value = response_time if date is None else date
    age_value = float(seconds(first(fields, "age")) or 0)
    # RFC 9111 §4.2.3.
    apparent_age = max(0.0, response_time - date_value)
    corrected_age_value = age_value + max(0.0, response_time - request_time)
    lifetime = freshness_lifetime(control, fields, date_value)
    # Its Age is counted above; an answer from the cache says its own.
    fields = tuple((name, value) for name, value in fields if name.lower() != "age")
    entry = Entry(
        primary=primary,
        vary=names,
        key=secondary(names, request_headers),
        status=status,
        reason=reason,
        headers=fields,
        body=body,
        response_time=response_time,
        corrected_initial_age=max(apparent_age, corrected_age_value),
        freshness_lifetime=lifetime,
        no_cache="no-cache" in control,
        etag=first(fields, "etag"),
        last_modified=first(fields, "last-modified"),
    )
    if not entry.validated and (entry.no_cache or lifetime <= 0):
        return None
    return entry


def freshness_lifetime(control: dict[str, str | None], fields: Items, date_value: float) -> float:
    """RFC 9111 §4.2.1 for a private cache without heuristics: max-age, else Expires minus
    Date, else 0 (stale at once). s-maxage is for shared caches; a malformed value is stale."""
    if "max-age" in control:
        return float(seconds(control["max-age"]) or 0)
    expires = every(fields, "expires")
    if expires:
        at = http_date(expires[0])
        return 0.0 if at is None else max(0.0, at - date_value)
    return 0.0


def refreshed(
    entry: Entry,
    items: Items,
    *,
    request_headers: CIMultiDictProxy[str],
    request_time: float,
    response_time: float,
) -> Entry | None:
    """`entry` brought up to date by a 304 (hishel's §4.3.4 selection and §3.2 merge), or
    None when the 304 does not select it."""
    method, url = entry.primary[1], entry.primary[2]
    stored = hishel.Entry(
        id=uuid4(),
        request=hishel.Request(method=method, url=url),
        response=hishel.Response(status_code=entry.status, headers=_hishel_headers(entry.headers)),
    )
    request = hishel.Request(method=method, url=url)
    state = hishel.NeedRevalidation(
        options=_PRIVATE, request=request, original_request=request, revalidating_entries=[stored]
    ).next(hishel.Response(status_code=304, headers=_hishel_headers(items)))
    if not isinstance(state, hishel.NeedToBeUpdated):
        return None
    kept = state.updating_entries[-1].response.headers
    replaced = {name.lower() for name, _ in items if name.lower() not in _CONTENT_FIELDS}
    merged = [(name, value) for name, value in entry.headers if name.lower() not in replaced]
    merged += [(name, value) for name, value in items if name.lower() in replaced]
    return entry_of(
        primary=entry.primary,
        request_headers=request_headers,
        status=entry.status,
        reason=entry.reason,
        fields=_kept(merged, kept),
        body=entry.body,
        request_time=request_time,
        response_time=response_time,
    )


# What a 304 never replaces of the stored answer: it describes the stored body (hishel's list).
_CONTENT_FIELDS = frozenset({"content-encoding", "content-type", "content-range", "content-length"})

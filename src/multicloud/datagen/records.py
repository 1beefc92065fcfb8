"""The text records of the generated dataset: JSONL application logs and CSV order exports.

A few thousand distinct records are formatted once into a pool; each line samples one and
numpy stamps the per-line fields (timestamps, trace ids, latencies) for a whole block of
lines at once.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

U8 = npt.NDArray[np.uint8]
I64 = npt.NDArray[np.int64]
BytesArray = npt.NDArray[np.object_]  # an array of bytes objects, for sampling by index
_DAY_MS = 86_400_000
_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
_POOL_SIZE = 4000  # distinct log records and order lines; each line samples one


# --- stamping per-line fields in bulk ----------------------------------------------------------


def _template(text: bytes, count: int) -> U8:
    """Return `count` rows, each a copy of `text`, to stamp per-line fields into."""
    return np.tile(np.frombuffer(text, dtype=np.uint8), (count, 1))


def _rows(matrix: U8) -> list[bytes]:
    """Return each row of `matrix` as bytes (rows never end in NUL, which numpy would strip)."""
    rows: list[bytes] = matrix.view(f"S{matrix.shape[1]}").ravel().tolist()
    return rows


def _put_digits(matrix: U8, col: int, values: I64, width: int) -> None:
    """Write `values` as zero-padded decimals of `width` digits at column `col`."""
    for place in range(width):
        matrix[:, col + width - 1 - place] = values // 10**place % 10 + ord("0")


def _put_hex(matrix: U8, col: int, width: int, rng: np.random.Generator) -> None:
    """Write `width` random lowercase hex digits at column `col`."""
    raw = rng.integers(0, 256, size=(matrix.shape[0], width // 2), dtype=np.uint8)
    matrix[:, col : col + width : 2] = _HEX[raw >> 4]
    matrix[:, col + 1 : col + width : 2] = _HEX[raw & 15]


def _put_timestamps(matrix: U8, col: int, epoch_ms: I64, millis: bool) -> None:
    """Write ISO-8601 "YYYY-MM-DDTHH:MM:SS[.mmm]" times at column `col` (times ascending)."""
    days = epoch_ms // _DAY_MS
    first = int(days[0])
    calendar = np.arange(first, int(days[-1]) + 1, dtype=np.int64).astype("datetime64[D]")
    dates = np.datetime_as_string(calendar).astype("S10").view(np.uint8).reshape(-1, 10)
    matrix[:, col : col + 10] = dates[days - first]
    of_day = epoch_ms % _DAY_MS
    _put_digits(matrix, col + 11, of_day // 3_600_000, 2)
    _put_digits(matrix, col + 14, of_day // 60_000 % 60, 2)
    _put_digits(matrix, col + 17, of_day // 1000 % 60, 2)
    if millis:
        _put_digits(matrix, col + 20, of_day % 1000, 3)


def _clock(rng: np.random.Generator, month: int) -> int:
    """Return a random start time within the first three weeks of `month` 2026, epoch ms."""
    start = dt.datetime(2026, month, 1, tzinfo=dt.UTC)
    return int(start.timestamp() * 1000) + int(rng.integers(0, 21 * _DAY_MS))


def _ticks(rng: np.random.Generator, start_ms: int, count: int, mean_gap_ms: float) -> I64:
    """Return `count` ascending times after `start_ms`, with exponential gaps."""
    gaps = rng.exponential(mean_gap_ms, count).astype(np.int64)
    return start_ms + np.cumsum(gaps)


def _as_table(items: list[bytes]) -> tuple[BytesArray, I64]:
    """Return `items` as an array to sample by index, and their lengths."""
    table = np.empty(len(items), dtype=object)
    table[:] = items
    return table, np.array([len(item) for item in items], dtype=np.int64)


def _filler(length: int) -> str:
    """Return exactly `length` characters of plain words (no quotes, commas or backslashes)."""
    phrase = " see previous entries for details and retry with backoff if the problem persists"
    return (phrase * (length // len(phrase) + 1))[:length]


# --- JSONL application logs --------------------------------------------------------------------

_SERVICES: dict[str, tuple[str, ...]] = {
    "checkout": (
        "/api/v1/cart",
        "/api/v1/cart/items/{n}",
        "/api/v1/checkout",
        "/api/v1/orders/{n}",
    ),
    "payments": ("/api/v1/payments", "/api/v1/payments/{n}/capture", "/api/v1/refunds/{n}"),
    "catalog": ("/api/v1/products/{n}", "/api/v1/categories/{w}", "/api/v1/products/{n}/reviews"),
    "search": ("/api/v1/search?q={w}", "/api/v1/search/suggest?q={w}&limit=10"),
    "auth": ("/oauth/token", "/api/v1/sessions", "/api/v1/users/{n}/mfa"),
    "inventory": ("/api/v1/stock/{n}", "/internal/reservations/{n}"),
    "shipping": ("/api/v1/shipments/{n}", "/api/v1/rates", "/api/v1/shipments/{n}/label"),
}
_METHODS = (("GET", 0.7), ("POST", 0.2), ("PUT", 0.06), ("DELETE", 0.04))
# (level, status, message, weight): messages match the level and status, as real ones do.
_OUTCOMES: tuple[tuple[str, int, str, float], ...] = (
    ("INFO", 200, "request completed", 50.0),
    ("INFO", 201, "{w} {n} created", 8.0),
    ("INFO", 204, "{w} {n} deleted", 3.0),
    ("INFO", 304, "not modified, served from cache", 6.0),
    ("DEBUG", 200, "cache hit for key {w}:{n}", 5.0),
    ("WARN", 200, "slow query on {w} took {n} ms", 3.0),
    ("WARN", 400, "validation failed: field {w} is required", 3.0),
    ("WARN", 401, "token expired for session {n}", 3.0),
    ("WARN", 404, "{w} {n} not found", 4.0),
    ("WARN", 429, "rate limit exceeded, retry after {s} s", 2.0),
    ("ERROR", 500, "unhandled exception in {w} handler", 1.5),
    ("ERROR", 502, "upstream {w} returned an invalid response", 1.0),
    ("ERROR", 503, "circuit breaker open for {w}", 1.0),
    ("ERROR", 504, "upstream timeout after {n} ms", 1.0),
)
_OUTCOME_ODDS = np.array([outcome[3] for outcome in _OUTCOMES]) / sum(o[3] for o in _OUTCOMES)
_METHOD_ODDS = np.array([method[1] for method in _METHODS])
_WORDS = (
    "cart", "order", "invoice", "customer", "product", "payment", "shipment", "session",
    "coupon", "review", "address", "warehouse", "discount", "wishlist", "refund", "label",
)  # fmt: skip
_LOG_STAMP = (
    b'{"ts":"YYYY-MM-DDTHH:MM:SS.mmmZ","trace_id":"' + b"t" * 32
    + b'","span_id":"' + b"s" * 16 + b'","level":"'
)  # fmt: skip
_TS_COL = _LOG_STAMP.index(b"YYYY")
_TRACE_COL = _LOG_STAMP.index(b"t" * 32)
_SPAN_COL = _LOG_STAMP.index(b"s" * 16)
_MAX_LATENCY_MS = 30_000


@dataclass(frozen=True, slots=True)
class _LogRecord:
    """The part of a log line that repeats across requests (everything but times and ids)."""

    level: str
    service: str
    host: str
    user_id: str
    method: str
    path: str
    status: int
    message: str

    def entry(self, padding: str = "") -> bytes:
        """Return the record as the middle of a JSON line, up to the latency value."""
        return (
            f'{self.level}","service":"{self.service}","host":"{self.host}",'
            f'"user_id":"{self.user_id}","method":"{self.method}","path":"{self.path}",'
            f'"status":{self.status},"message":"{self.message}{padding}","latency_ms":'
        ).encode()


class LogPool:
    """The distinct log records and latency values every log file samples from."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.records = _log_records(rng, _POOL_SIZE)
        self.entries, self.entry_lengths = _as_table([record.entry() for record in self.records])
        self.latencies, self.latency_lengths = _as_table(
            [f"{ms}}}\n".encode() for ms in range(_MAX_LATENCY_MS + 1)]
        )
        self.fit_record = self.records[int(np.argmin(self.entry_lengths))]
        self.longest = len(_LOG_STAMP) + int(self.entry_lengths.max()) + len(b"30000}\n")
        self.shortest = len(_LOG_STAMP) + int(self.entry_lengths.min()) + len(b"0}\n")
        self.shortest_fit = self.shortest
        self.min_file = self.shortest_fit


def _log_records(rng: np.random.Generator, count: int) -> list[_LogRecord]:
    """Draw `count` plausible request records (all random draws in bulk, for speed)."""
    names = list(_SERVICES)
    services = rng.integers(len(names), size=count)
    outcomes = rng.choice(len(_OUTCOMES), size=count, p=_OUTCOME_ODDS)
    methods = rng.choice(len(_METHODS), size=count, p=_METHOD_ODDS)
    paths = rng.integers(1 << 20, size=count)  # taken modulo the service's number of paths
    hosts = rng.integers(2, 250, size=(count, 2))
    # A few heavy users and a long tail of occasional ones.
    users = np.minimum(rng.zipf(1.3, size=count), 999_999)
    words = rng.integers(len(_WORDS), size=(count, 2))
    numbers = rng.integers(1, 500_000, size=(count, 2))
    seconds = rng.integers(1, 120, size=count)
    records = []
    for i in range(count):
        service = names[services[i]]
        templates = _SERVICES[service]
        level, status, message, _ = _OUTCOMES[outcomes[i]]
        path = templates[paths[i] % len(templates)].format(w=_WORDS[words[i, 0]], n=numbers[i, 0])
        message = message.format(w=_WORDS[words[i, 1]], n=numbers[i, 1], s=seconds[i])
        records.append(
            _LogRecord(
                level=level,
                service=service,
                host=f"ip-10-{services[i]}-{hosts[i, 0] % 4}-{hosts[i, 1]}",
                user_id=f"u_{users[i]:06d}",
                method=_METHODS[methods[i]][0],
                path=path,
                status=status,
                message=message,
            )
        )
    return records


class LogLines:
    """The lines of one log file: pooled records with fresh times, trace ids and latencies."""

    header = b""

    def __init__(self, pool: LogPool, rng: np.random.Generator, month: int) -> None:
        self._pool = pool
        self._rng = rng
        self._now_ms = _clock(rng, month)
        self._drawn = np.array([self._now_ms], dtype=np.int64)  # times of the last lines drawn
        self.longest = pool.longest
        self.shortest = pool.shortest
        self.shortest_fit = pool.shortest_fit

    def _stamps(self, count: int) -> list[bytes]:
        """Return the per-line start of `count` lines: time, trace and span ids."""
        times = _ticks(self._rng, self._now_ms, count, mean_gap_ms=40.0)
        self._now_ms = int(times[-1])
        self._drawn = times
        matrix = _template(_LOG_STAMP, count)
        _put_timestamps(matrix, _TS_COL, times, millis=True)
        _put_hex(matrix, _TRACE_COL, 32, self._rng)
        _put_hex(matrix, _SPAN_COL, 16, self._rng)
        return _rows(matrix)

    def draw(self, count: int) -> tuple[list[list[bytes]], I64]:
        """Return `count` lines as columns of pieces, and their lengths."""
        pool = self._pool
        pick = self._rng.integers(0, len(pool.entries), count)
        # Latencies are log-normal around 40 ms with a long tail, like a web service's.
        latency = np.minimum(self._rng.lognormal(math.log(40), 1.0, count), _MAX_LATENCY_MS)
        latency_ms = latency.astype(np.int64)
        columns = [
            self._stamps(count),
            pool.entries[pick].tolist(),
            pool.latencies[latency_ms].tolist(),
        ]
        lengths = len(_LOG_STAMP) + pool.entry_lengths[pick] + pool.latency_lengths[latency_ms]
        return columns, lengths

    def rewind(self, unused: int) -> None:
        """Forget the last `unused` lines drawn, so that the next line follows the last kept."""
        if unused:
            self._now_ms = int(self._drawn[-unused - 1])

    def fit(self, length: int) -> bytes:
        """Return one line of exactly `length` bytes, its message padded to fit."""
        padding = _filler(length - self.shortest_fit)
        return self._stamps(1)[0] + self._pool.fit_record.entry(padding) + b"0}\n"


# --- CSV order exports -------------------------------------------------------------------------

_CSV_HEADER = (
    b"order_id,created_at,customer_id,country,currency,sku,product,quantity,unit_price,"
    b"status,channel,notes\n"
)
_ORDER_STAMP = b"ORD-NNNNNNNNNN,YYYY-MM-DDTHH:MM:SSZ,"
_ORDER_ID_COL = _ORDER_STAMP.index(b"N")
_CREATED_COL = _ORDER_STAMP.index(b"YYYY")
_COUNTRIES = (
    ("DE", "EUR"), ("FR", "EUR"), ("NL", "EUR"), ("ES", "EUR"), ("US", "USD"), ("GB", "GBP"),
    ("JP", "JPY"), ("CA", "CAD"), ("AU", "AUD"), ("SE", "SEK"), ("PL", "PLN"), ("BR", "BRL"),
)  # fmt: skip
_ADJECTIVES = (
    "Wireless", "Organic", "Stainless", "Compact", "Ergonomic", "Vintage", "Bamboo", "Smart",
    "Waterproof", "Ceramic", "Portable", "Recycled",
)  # fmt: skip
_NOUNS = (
    "Mouse", "Coffee Beans", "Water Bottle", "Desk Lamp", "Backpack", "Headphones", "Notebook",
    "Yoga Mat", "Kettle", "Charger", "Sneakers", "Phone Case",
)  # fmt: skip
_STATUSES = ("placed", "paid", "shipped", "delivered", "cancelled", "refunded")
_CHANNELS = ("web", "ios", "android", "marketplace", "store")
_NOTES = ("", "", "", "", "", "", "gift wrap", "leave at door", "express", "fragile")


@dataclass(frozen=True, slots=True)
class _OrderItem:
    """The product half of an order row: what was bought, how and in what state."""

    sku: str
    product: str
    quantity: int
    unit_price: str
    status: str
    channel: str
    notes: str

    def entry(self, padding: str = "") -> bytes:
        """Return the item as the end of a CSV row, newline included."""
        return (
            f"{self.sku},{self.product},{self.quantity},{self.unit_price},"
            f"{self.status},{self.channel},{self.notes}{padding}\n"
        ).encode()


class OrderPool:
    """The distinct customers and order items every CSV export samples from."""

    def __init__(self, rng: np.random.Generator) -> None:
        countries = rng.integers(len(_COUNTRIES), size=_POOL_SIZE)
        ids = rng.integers(1, 10_000_000, size=_POOL_SIZE)
        self.customers, self.customer_lengths = _as_table(
            [
                "C{:07d},{},{},".format(ids[i], *_COUNTRIES[countries[i]]).encode()
                for i in range(_POOL_SIZE)
            ]
        )
        self.items = _order_items(rng, _POOL_SIZE)
        self.entries, self.entry_lengths = _as_table([item.entry() for item in self.items])
        self.fit_customer = bytes(self.customers[int(np.argmin(self.customer_lengths))])
        # Only a row without notes can take padding as its notes.
        self.fit_item = min(
            (item for item in self.items if not item.notes), key=lambda i: len(i.entry())
        )
        width = len(_ORDER_STAMP)
        self.longest = width + int(self.customer_lengths.max()) + int(self.entry_lengths.max())
        self.shortest = width + int(self.customer_lengths.min()) + int(self.entry_lengths.min())
        self.shortest_fit = width + len(self.fit_customer) + len(self.fit_item.entry())
        self.min_file = len(_CSV_HEADER) + self.shortest_fit


def _order_items(rng: np.random.Generator, count: int) -> list[_OrderItem]:
    """Draw `count` plausible order items (all random draws in bulk, for speed)."""
    adjectives = rng.integers(len(_ADJECTIVES), size=count)
    nouns = rng.integers(len(_NOUNS), size=count)
    skus = rng.integers(10_000, 100_000, size=count)
    # Mostly one of a thing, sometimes a handful; prices log-normal around 25.
    quantities = np.minimum(rng.geometric(0.6, size=count), 20)
    prices = rng.lognormal(math.log(25), 0.8, size=count)
    statuses = rng.integers(len(_STATUSES), size=count)
    channels = rng.integers(len(_CHANNELS), size=count)
    notes = rng.integers(len(_NOTES), size=count)
    return [
        _OrderItem(
            sku=f"SKU-{skus[i]}",
            product=f"{_ADJECTIVES[adjectives[i]]} {_NOUNS[nouns[i]]}",
            quantity=int(quantities[i]),
            unit_price=f"{prices[i]:.2f}",
            status=_STATUSES[statuses[i]],
            channel=_CHANNELS[channels[i]],
            notes=_NOTES[notes[i]],
        )
        for i in range(count)
    ]


class OrderLines:
    """The rows of one CSV export: pooled customers and items with fresh order ids and times."""

    header = _CSV_HEADER

    def __init__(self, pool: OrderPool, rng: np.random.Generator, month: int) -> None:
        self._pool = pool
        self._rng = rng
        self._now_ms = _clock(rng, month)
        self._next_id = int(rng.integers(10**6, 10**9))
        self._drawn = np.array([self._now_ms], dtype=np.int64)  # times of the last rows drawn
        self.longest = pool.longest
        self.shortest = pool.shortest
        self.shortest_fit = pool.shortest_fit

    def _stamps(self, count: int) -> list[bytes]:
        """Return the per-row start of `count` rows: order id and creation time."""
        times = _ticks(self._rng, self._now_ms, count, mean_gap_ms=3000.0)
        self._now_ms = int(times[-1])
        self._drawn = times
        ids = self._next_id + np.arange(count, dtype=np.int64)
        self._next_id += count
        matrix = _template(_ORDER_STAMP, count)
        _put_digits(matrix, _ORDER_ID_COL, ids, 10)
        _put_timestamps(matrix, _CREATED_COL, times, millis=False)
        return _rows(matrix)

    def draw(self, count: int) -> tuple[list[list[bytes]], I64]:
        """Return `count` rows as columns of pieces, and their lengths."""
        pool = self._pool
        who = self._rng.integers(0, len(pool.customers), count)
        what = self._rng.integers(0, len(pool.entries), count)
        columns = [self._stamps(count), pool.customers[who].tolist(), pool.entries[what].tolist()]
        lengths = len(_ORDER_STAMP) + pool.customer_lengths[who] + pool.entry_lengths[what]
        return columns, lengths

    def rewind(self, unused: int) -> None:
        """Forget the last `unused` rows drawn, so that the next row follows the last kept."""
        if unused:
            self._now_ms = int(self._drawn[-unused - 1])
            self._next_id -= unused

    def fit(self, length: int) -> bytes:
        """Return one row of exactly `length` bytes, its notes padded to fit."""
        padding = _filler(length - self.shortest_fit)
        pool = self._pool
        return self._stamps(1)[0] + pool.fit_customer + pool.fit_item.entry(padding)
